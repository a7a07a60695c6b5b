"""SGD and the learning-rate schedules, as pure functions of the optimizer step.

Every schedule is a `LambdaLR` over optimizer steps whose factor depends only on (step, total
steps, warmup steps), so a resumed run and a run cut short by `train.max_steps` follow exactly the
curve of the full run. A resume rebuilds the schedule at its step rather than loading it, and
`apply_hyperparameters` puts the config's values back into a loaded optimizer: what a run uses is
always what its config says (a checkpoint brings only the state: momentum buffers, the step).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nin_dist.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def apply_hyperparameters(opt: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Overwrite the hyperparameters a loaded optimizer state carries with the config's."""
    for group in opt.param_groups:
        group.update(initial_lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
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
                    epochs: int, step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a run of `epochs`; `step` optimizer steps already taken (a resume).

    The optimizer's lr is set for step `step` at once, as if `scheduler.step()` had run `step` times.
    """
    for group in opt.param_groups:
        group["initial_lr"] = cfg.lr  # LambdaLR's base lr; required when starting at step > 0
    total = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "onecycle" and warmup == 0:
        warmup = max(1, total // 4)  # the rise defaults to a quarter of the run
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, total, warmup, cfg.schedule),
                                             last_epoch=step - 1)


def state_is_finite(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """True when every float in the model's state and the optimizer's state is finite (one host sync)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    tensors += [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.is_floating_point()]
    return bool(torch.stack([t.isfinite().all() for t in tensors]).all())
