"""An exponential moving average (EMA) of a model's weights and buffers, updated after each optimizer step.

After update t (0-based) every floating tensor of the state (parameters, BatchNorm running
statistics) is

    ema <- d_t * ema + (1 - d_t) * current,   d_t = min(train.ema_decay, (1 + t) / (10 + t)),

and integer buffers (BatchNorm's batch count) are copied. The ramp of d_t (TensorFlow's
`ExponentialMovingAverage(num_updates=...)`) keeps the random initial weights from lingering: with
a constant d = 0.999 they would still weigh d**2000 = 13% after 2,000 steps, a whole short run.
Every rank holds the same weights after a step (DDP), so every rank's average is the same too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def decay_at(decay: float, updates: int) -> float:
    """d_t for the update that follows `updates` earlier ones."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA:
    """`module` is a copy of the model holding the average; evaluate and log it like the model itself."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, updates: int) -> None:
        """Move the average towards `model`'s current state; `updates` done before this one."""
        weight = 1.0 - decay_at(self.decay, updates)
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            if average.is_floating_point():
                average.lerp_(current[name], weight)  # average + weight * (current - average)
            else:
                average.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
