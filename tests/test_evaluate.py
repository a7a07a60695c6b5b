"""Evaluation with mirror TTA: the mean of the two views' probabilities, against both views scored by hand,
and the served classifier's TTA, the same computation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import CPU_CONFIG

from nin_dist.classifier import RawImageClassifier
from nin_dist.config import load_config
from nin_dist.data import load_split, to_inputs
from nin_dist.distributed import DistInfo
from nin_dist.evaluate import evaluate
from nin_dist.model import build_model

WORLD_OF_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"),
                        backend=None)


def test_tta_scores_the_mean_of_the_image_and_mirror_probabilities(data_root):
    split = load_split(data_root, "test", limit=60)
    # An input larger than 28 px: the network's input of the mirrored image is the mirror of its input.
    cfg = load_config(CPU_CONFIG, ["data.resize=36", "model.width=0.25", "train.eval_batch_size=25",
                                   "train.precision=fp32", "train.channels_last=false"])
    model = _trained_a_little(build_model(cfg.model), load_split(data_root, "train", limit=512), cfg.data)
    with torch.no_grad():
        views = [F.softmax(model(to_inputs(images, cfg.data)), 1) for images in (split.images, split.images.flip(-1))]
    mean = (views[0] + views[1]) / 2
    tta = load_config(CPU_CONFIG, ["data.resize=36", "train.eval_batch_size=25", "train.tta=true",
                                   "train.precision=fp32", "train.channels_last=false"])
    scored = evaluate(model, split, cfg.data, tta.train, WORLD_OF_ONE, with_predictions=True)
    expected_loss = -mean[torch.arange(len(split)), split.labels].log().mean().item()
    assert abs(scored.loss - expected_loss) < 1e-5, (scored.loss, expected_loss)
    assert torch.equal(scored.predictions, mean.argmax(1))
    assert scored.acc == (mean.argmax(1) == split.labels).double().mean().item() and scored.count == 60

    # What the logged model serves averages the same way, to the bit (one batch, as evaluate scored it).
    with torch.no_grad():
        served = RawImageClassifier(model.eval(), cfg.data, tta=True)(split.images[:25])  # evaluate left it training
    assert torch.equal(served, scored.probabilities[:25])

    plain = evaluate(model, split, cfg.data, cfg.train, WORLD_OF_ONE)  # one view: the image itself
    expected_plain = -views[0][torch.arange(len(split)), split.labels].log().mean().item()
    assert abs(plain.loss - expected_plain) < 1e-5 and abs(plain.loss - scored.loss) > 1e-4


def _trained_a_little(model, train, data):
    """A few steps, so the two views' predictions are far from uniform and differ."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(16):
        index = torch.arange(32 * step, 32 * step + 32)
        opt.zero_grad()
        F.cross_entropy(model(to_inputs(train.images[index], data)), train.labels[index]).backward()
        opt.step()
    return model.eval()
