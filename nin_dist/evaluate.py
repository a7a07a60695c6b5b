"""Exact evaluation over all ranks: each rank scores its own shard, the sums are reduced, and every
image counts once however many ranks there are (10,000 test images over 3 ranks included)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nin_dist import distributed
from nin_dist.config import DataConfig, TrainConfig
from nin_dist.data import Split, eval_batches
from nin_dist.distributed import DistInfo
from nin_dist.precision import autocast, prepare


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy (no label smoothing), over every image of the split
    acc: float
    count: int  # images scored, over all ranks
    predictions: torch.Tensor | None  # [count] predicted classes on every rank, when asked for


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, data: DataConfig, train: TrainConfig, info: DistInfo,
             with_predictions: bool = False) -> Evaluation:
    """Score `split` with `model` in eval mode (it is put back in train mode after); one host sync."""
    model.eval()
    sums = torch.zeros(3, device=info.device, dtype=torch.float64)  # loss sum, correct, images
    preds = torch.zeros(len(split), device=info.device, dtype=torch.long) if with_predictions else None
    for inputs, labels, index in eval_batches(split, data, train.eval_batch_size, info.rank, info.world_size):
        with autocast(train, info.device):
            logits = model(prepare(inputs, train)).float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.argmax(1) == labels).sum()
        sums[2] += labels.numel()
        if preds is not None:
            preds[index.to(info.device)] = logits.argmax(1)
    distributed.all_reduce_sum_(sums)
    if preds is not None:
        distributed.all_reduce_sum_(preds)  # every other rank holds zeros at this rank's indices
    loss, correct, count = sums.tolist()
    model.train()
    return Evaluation(loss / count, correct / count, int(count), preds)
