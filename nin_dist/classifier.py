"""The trained network as a classifier of raw images: what the logged model computes, as one graph.

`RawImageClassifier(network, data, tta)` takes Fashion-MNIST images as the IDX files hold them, uint8
[N, 1, 28, 28], and returns the class probabilities [N, 10] (fp32). Everything the run did before
the network is inside, read from the run's config: `nin_dist.data.to_inputs` (scale to [0, 1],
`data.normalize`, resize to `data.resize`, one channel), then the network, the softmax and, with
`train.tta`, the mean of the image's and its mirror image's probabilities: the class probabilities
of `nin_dist.evaluate.class_log_probabilities`, the function the evaluation scores with.
Training's random draws (flips, augmentation) are not part of it: they are for training.

`export_classifier` traces it with `torch.export` (batch size dynamic, from 1) and saves the graph
(`torch.export.save`). Loading that file (`torch.export.load`) needs torch alone, not this package,
and unpickles nothing: it is what the MLflow model serves (`nin_dist.tracking.served_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nin_dist.config import DataConfig
from nin_dist.data import IMAGE_SIDE, to_inputs
from nin_dist.evaluate import class_log_probabilities

MAX_BATCH = 1 << 20  # the exported graph's largest batch (torch.export wants a bound; callers send chunks)


class RawImageClassifier(nn.Module):
    """uint8 images [N, 1, 28, 28] -> class probabilities [N, classes]: the run's preprocessing, the
    network (in eval mode, as given) and the run's TTA."""

    def __init__(self, network: nn.Module, data: DataConfig, tta: bool):
        super().__init__()
        self.network, self.data, self.tta = network, data, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_inputs(images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE), self.data)
        return class_log_probabilities(self.network, x, self.tta).exp()


def export_classifier(network: nn.Module, data: DataConfig, tta: bool, images: torch.Tensor, path: Path) -> None:
    """Save the classifier of `network` (CPU, fp32, eval mode) as a torch.export graph at `path`;
    `images` (uint8 [B, 28, 28] or [B, 1, 28, 28]) are the example it is traced with."""
    example = images.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).cpu()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(RawImageClassifier(network, data, tta).eval(), (example,),
                                      dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
