"""SGD and the learning-rate schedules, as pure functions of the optimizer step.

Every schedule is a `LambdaLR` over optimizer steps whose factor depends only on (step, total
steps, warmup steps), so a resumed run and a run cut short by `train.max_steps` follow exactly the
curve of the full run.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nin_dist.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier on optim.lr for the step about to be taken (0-based)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        if step < warmup:
            return (step + 1) / warmup  # linear warmup from ~0 to the peak
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "onecycle":
        # Triangle: linear rise from peak/25 to the peak over `warmup`, then linear decay to 0.
        rise = max(1, warmup)
        if step < rise:
            return 0.04 + 0.96 * step / rise
        return max(0.0, (total - step) / max(1, total - rise))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warmup == 0:
        warmup = max(1, total // 4)  # the rise defaults to a quarter of the run
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, cfg.schedule))
