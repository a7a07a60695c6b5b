"""Layers that make N ranks compute what one process computes on the same global batch.

Plain BatchNorm normalises with each rank's own batch statistics, and plain Dropout draws each
rank's mask from that rank's RNG; both make a 2-process run differ from a 1-process run of the same
global batch. `CrossRankBatchNorm2d` reduces its statistics over all ranks (torch's SyncBatchNorm
does this on GPUs only), and `GlobalBatchDropout` draws one mask for the whole global batch from a
generator seeded per step, of which each rank takes its rows. Both subclass the torch layer they
replace, so parameter names, buffers and state_dict keys are unchanged.

What is left between N ranks and one process is float rounding: a sum over 2 x 16 images is
rounded differently from the same sum over 32. In fp32 that difference (~1e-7) is amplified by
training itself (a ReLU that flips sign changes a gradient by far more than the rounding that
flipped it), so trajectories part within about ten steps, as they do between two runs of one
process from weights 1e-7 apart. In fp64 (`train.precision=fp64`) N ranks and one process stay
within ~1e-12 of each other for hundreds of steps; tests/test_distributed.py checks it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _GatherFromRanks(torch.autograd.Function):
    """all_gather with a backward: [world, *shape] on every rank; each rank's slice gets the sum of
    every rank's gradient for it (that rank's input feeds every rank's loss)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.compiler.disable  # a collective inside the forward; compiled code calls it as one opaque op
def gather_from_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable [world_size, *shape] stack of every rank's `tensor` ([1, *shape] in a world of one)."""
    if not _distributed():
        return tensor.unsqueeze(0)
    return _GatherFromRanks.apply(tensor)


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all ranks.

    Each rank computes its own per-channel mean and sum of squared deviations (M2) in two passes;
    one all_gather brings every rank's pair, and they combine exactly as the global batch's
    (Chan et al.: with equal counts n per rank, mean = mean of means and
    M2 = sum of M2 + n * sum of (rank mean - mean)^2). Unlike E[x^2] - mean^2 nothing cancels, and
    one collective each way per layer keeps the step short on a slow interconnect. Statistics are
    computed in fp32 at least (fp64 stays fp64); the output has the input's dtype. Every rank must
    hold the same number of images, as `TrainBatches` guarantees.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not _distributed():
            # A world of one: the global batch is this batch, and torch's fused kernel is faster.
            return super().forward(x)
        xf = x if x.dtype == torch.float64 else x.float()
        n = x.numel() // x.shape[1]  # values per channel on this rank
        var_r, mean_r = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        stats = gather_from_ranks(torch.stack([mean_r, var_r * n]))  # [world, 2, C]: mean, M2
        means, m2s = stats[:, 0], stats[:, 1]
        mean = means.mean(0)
        total = n * stats.shape[0]
        var = (m2s.sum(0) + n * ((means - mean) ** 2).sum(0)) / total  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
            unbiased = var.detach() * (total / max(total - 1, 1))
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        scale = self.weight.to(xf.dtype) * torch.rsqrt(var + self.eps)
        centered = xf - mean.view(1, -1, 1, 1)
        return (centered * scale.view(1, -1, 1, 1) + self.bias.to(xf.dtype).view(1, -1, 1, 1)).to(x.dtype)


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
        return x * _keep_mask(x, self.p, *self._rows)


@torch.compiler.disable  # a fresh generator per step: eager, so compiled graphs never guard on the seed
def _keep_mask(x: torch.Tensor, p: float, offset: int, global_rows: int, seed: int) -> torch.Tensor:
    """This rank's rows of the global batch's mask, already scaled by 1 / (1 - p)."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.rand((global_rows, *x.shape[1:]), generator=gen, device=x.device)
    keep = noise[offset: offset + x.shape[0]] >= p
    return keep.to(x.dtype) * (1.0 / (1.0 - p))
