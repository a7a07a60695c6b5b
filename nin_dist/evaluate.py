"""Exact evaluation over all ranks: each rank scores its own shard, the sums are reduced, and every
image counts once however many ranks there are (10,000 test images over 3 ranks included).

With `train.tta` each image is scored with its mirror image too, and the prediction is the mean of
the two class-probability vectors: an ensemble of two views. The probabilities are averaged rather
than the logits because the mean of two distributions is a distribution each view agrees to in
part, and its log loss is the loss of a prediction the model actually makes; averaging logits
multiplies the two distributions (a normalised geometric mean), which is sharper than either view
where they agree and lets one confidently wrong view outvote a hesitant right one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nin_dist import distributed
from nin_dist.config import DataConfig, TrainConfig
from nin_dist.data import CLASSES, Split, eval_batches
from nin_dist.distributed import DistInfo
from nin_dist.precision import autocast, prepare

NUM_CLASSES = len(CLASSES)


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy (no label smoothing) of the (TTA-averaged) probabilities, over the split
    acc: float
    count: int  # images scored, over all ranks
    predictions: torch.Tensor | None  # [count] predicted classes on every rank, when asked for
    probabilities: torch.Tensor | None = None  # [count, classes] (TTA-averaged) class probabilities, with them


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, data: DataConfig, train: TrainConfig, info: DistInfo,
             with_predictions: bool = False) -> Evaluation:
    """Score `split` with `model` in eval mode (it is put back in train mode after); one host sync."""
    model.eval()
    sums = torch.zeros(3, device=info.device, dtype=torch.float64)  # loss sum, correct, images
    preds = torch.zeros(len(split), device=info.device, dtype=torch.long) if with_predictions else None
    probs = torch.zeros(len(split), NUM_CLASSES, device=info.device) if with_predictions else None
    for inputs, labels, index in eval_batches(split, data, train.eval_batch_size, info.rank, info.world_size):
        log_p = log_probabilities(model, prepare(inputs, train), train, info.device)
        sums[0] += F.nll_loss(log_p, labels, reduction="sum")  # cross-entropy: log_p is a log_softmax
        sums[1] += (log_p.argmax(1) == labels).sum()
        sums[2] += labels.numel()
        if preds is not None:
            preds[index.to(info.device)] = log_p.argmax(1)
            probs[index.to(info.device)] = log_p.exp()
    distributed.all_reduce_sum_(sums)
    if preds is not None:
        distributed.all_reduce_sum_(preds)  # every other rank holds zeros at this rank's indices
        distributed.all_reduce_sum_(probs)
    loss, correct, count = sums.tolist()
    model.train()
    return Evaluation(loss / count, correct / count, int(count), preds, probs)


def log_probabilities(model: torch.nn.Module, inputs: torch.Tensor, train: TrainConfig,
                      device: torch.device) -> torch.Tensor:
    """[B, classes] log class probabilities (fp32) under the run's autocast; with train.tta, of the
    mean over each image and its mirror."""
    with autocast(train, device):
        return class_log_probabilities(model, inputs, train.tta)


def class_log_probabilities(model: torch.nn.Module, inputs: torch.Tensor, tta: bool) -> torch.Tensor:
    """[B, classes] log class probabilities (fp32) of `inputs`; with `tta`, log((p + p') / 2) where
    p' is the mirror image's. The one place TTA is computed: the evaluation and the served model
    (`nin_dist.classifier`) both call it, so they average the same way."""
    log_p = F.log_softmax(model(inputs).float(), 1)
    if not tta:
        return log_p
    mirrored = F.log_softmax(model(inputs.flip(-1)).float(), 1)
    return torch.logaddexp(log_p, mirrored) - math.log(2)  # log((p + p') / 2), without leaving log space
