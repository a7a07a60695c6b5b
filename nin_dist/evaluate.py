"""Exact evaluation over all ranks: each rank scores its own shard, the sums are reduced, and every
image counts once however many ranks there are (10,000 test images over 3 ranks included).

With `train.tta` each image is scored with its mirror image too, and the prediction is the mean of
the two class-probability vectors: an ensemble of two views. With `train.tta_shifts=s` the image
moved by (+s, +s) and by (-s, -s) pixels are views too (each with its mirror under `train.tta`): up
to six. A shift moves the 28 x 28 pixels before any preprocessing and fills with zeros, as
`data.translate` moves a training image (`nin_dist.augment.translate`), so a view is an image of the
kind training showed the network: zero is the background only before normalising, and a pixel of
the resized input is not a pixel of the image. The probabilities are averaged rather than the
logits because the mean of distributions is a distribution each view agrees to in part, and its log
loss is the loss of a prediction the model actually makes; averaging logits multiplies the
distributions (a normalised geometric mean), which is sharper than any view where they agree and
lets one confidently wrong view outvote hesitant right ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nin_dist import augment, distributed
from nin_dist.config import DataConfig, TrainConfig
from nin_dist.data import CLASSES, Split, eval_batches, to_inputs
from nin_dist.distributed import DistInfo
from nin_dist.precision import autocast, prepare

NUM_CLASSES = len(CLASSES)


@dataclass(frozen=True)
class TTA:
    """The views an image is scored in besides itself: what the run's `train.tta*` keys ask for."""

    mirror: bool = False  # train.tta: every view and its mirror image
    shifts: int = 0  # train.tta_shifts: s > 0 adds the image moved by (+s, +s) and by (-s, -s) pixels

    @classmethod
    def of(cls, train: TrainConfig) -> TTA:
        return cls(train.tta, train.tta_shifts)


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
    for images, labels, index in eval_batches(split, train.eval_batch_size, info.rank, info.world_size):
        log_p = log_probabilities(model, images, data, train, info.device)
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


def log_probabilities(model: torch.nn.Module, images: torch.Tensor, data: DataConfig, train: TrainConfig,
                      device: torch.device) -> torch.Tensor:
    """[B, classes] log class probabilities (fp32) of uint8 images [B, 28, 28], preprocessed as `data`
    says, in the run's dtype and autocast; with train.tta / train.tta_shifts, of the mean over the views."""
    views = [prepare(x, train) for x in view_inputs(images, data, train.tta_shifts)]
    with autocast(train, device):
        return class_log_probabilities(model, views, train.tta)


def view_inputs(images: torch.Tensor, data: DataConfig, shifts: int) -> list[torch.Tensor]:
    """The network inputs (`nin_dist.data.to_inputs`) of uint8 images [B, 28, 28]: of the images, then
    with `shifts` = s > 0 of the images moved by (+s, +s) and by (-s, -s) pixels, zero fill."""
    views = [images]
    for step in (shifts, -shifts) if shifts else ():
        moves = images.new_full((images.shape[0], 2), step, dtype=torch.long)  # (dy, dx) of every image
        views.append(augment.translate(images, moves, shifts))
    return [to_inputs(view, data) for view in views]


def class_log_probabilities(model: torch.nn.Module, views: list[torch.Tensor], mirror: bool) -> torch.Tensor:
    """[B, classes] log class probabilities (fp32) of the mean of the views' probabilities, each view's
    mirror image included with `mirror`: log((p + p') / 2) for one view and its mirror. The one place
    TTA is averaged: the evaluation and the served model (`nin_dist.classifier`) both call it, with the
    views of `view_inputs`, so they average the same way."""
    log_p, count = None, 0
    for inputs in views:
        for view in (inputs, inputs.flip(-1)) if mirror else (inputs,):
            scored = F.log_softmax(model(view).float(), 1)
            log_p = scored if log_p is None else torch.logaddexp(log_p, scored)  # log(p + p'): stays in log space
            count += 1
    return log_p if count == 1 else log_p - math.log(count)
