"""An exponential moving average (EMA) of a model's weights and buffers, updated after each optimizer step.

Until the optimizer step `start` (`train.ema_start` epochs of steps) the average copies the state.
From there, update t (0-based, counted from `start`) makes every floating tensor of the state
(parameters, BatchNorm running statistics)

    ema <- d_t * ema + (1 - d_t) * current,   d_t = min(train.ema_decay, (1 + t) / (10 + t)),

and integer buffers (BatchNorm's batch count) are copied. The ramp of d_t (TensorFlow's
`ExponentialMovingAverage(num_updates=...)`) keeps the weights it starts from (the random initial
ones, or those at the start) from lingering: with a constant d = 0.999 they would still weigh
d**2000 = 13% after 2,000 steps, a whole short run.
A late start leaves out the weights of the first, fast-moving steps altogether. Every rank holds the
same weights after a step (DDP), so every rank's average is the same too; which update copies and
which averages is decided by the optimizer step count alone, so a resumed run does what it would have.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nin_dist.config import TrainConfig


def decay_at(decay: float, updates: int) -> float:
    """d_t for the update that follows `updates` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA:
    """`module` is a copy of the model holding the average; evaluate and log it like the model itself."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.decay, self.start = decay, start  # start: the optimizer steps whose weights are copied, not averaged
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Move the average towards `model`'s current state (before the start: copy it); `updates` done
        before this one."""
        weight = 1.0 - decay_at(self.decay, updates - self.start) if updates >= self.start else None
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            if weight is not None and average.is_floating_point():
                average.lerp_(current[name], weight)  # average + weight * (current - average)
            else:
                average.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def make_ema(model: nn.Module, train: TrainConfig, steps_per_epoch: int) -> WeightEMA | None:
    """The average train.ema_decay asks for (None when 0), started after train.ema_start epochs of
    optimizer steps (rounded to a step, as optim.warmup_epochs is)."""
    return WeightEMA(model, train.ema_decay, round(train.ema_start * steps_per_epoch)) if train.ema_decay else None
