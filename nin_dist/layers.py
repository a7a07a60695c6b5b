"""Layers that make N ranks compute what one process computes on the same global batch.

Plain BatchNorm normalises with each rank's own batch statistics, and plain Dropout draws each
rank's mask from that rank's RNG; both make a 2-process run differ from a 1-process run of the same
global batch. `CrossRankBatchNorm2d` reduces its statistics over all ranks (torch's SyncBatchNorm
does this on GPUs only), and `GlobalBatchDropout` draws one mask for the whole global batch from a
generator seeded per step, of which each rank takes its rows. Both subclass the torch layer they
replace, so parameter names, buffers and state_dict keys are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / channels, device=x.device, dtype=torch.float32)
        stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
        if dist.is_initialized():
            stats = dist_fn.all_reduce(stats)  # differentiable: grads flow back to every rank's x
        total, total_sq, n = stats[:channels], stats[channels:2 * channels], stats[-1]
        mean = total / n
        var = (total_sq / n - mean * mean).clamp_min(0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        return (xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)


class GlobalBatchDropout(nn.Dropout):
    """Dropout with one mask per global batch; each rank applies its own rows of it.

    The trainer calls `set_rows(offset, global_rows, seed)` before each step; without that call (or
    in eval mode) it is plain nn.Dropout.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self._rows: tuple[int, int, int] | None = None

    def set_rows(self, offset: int, global_rows: int, seed: int) -> None:
        self._rows = (offset, global_rows, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self._rows is None:
            return super().forward(x)
        offset, global_rows, seed = self._rows
        gen = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.rand((global_rows, *x.shape[1:]), generator=gen, device=x.device)
        keep = noise[offset: offset + x.shape[0]] >= self.p
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))
