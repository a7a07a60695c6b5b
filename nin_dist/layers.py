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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# The collectives and the per-step mask generator are custom ops. torch.compile, whoever calls it on
# whatever module holds these layers, keeps each as one opaque node: it never traces into the
# collectives (it would rewrite them as its own functional collectives) nor into the per-step
# torch.Generator (a graph break at every dropout). Each fake (meta) implementation gives the shapes,
# dtypes and strides the real one returns; registering them costs milliseconds at import and never
# imports torch._dynamo (tests/test_layout.py).


@torch.library.custom_op("nin_dist::global_batch_stats", mutates_args=())
def _global_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel of the global batch: one all_gather.

    Each rank contributes its mean and sum of squared deviations (M2); with equal counts n per rank
    they combine exactly (Chan et al.): mean = mean of means, M2 = sum of M2 + n * sum of
    (rank mean - mean)^2. Unlike E[x^2] - mean^2 nothing cancels. At least fp32 (fp64 stays fp64).
    """
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.numel() // x.shape[1]  # values per channel on this rank
    # torch's training-mode kernel computes the statistics ~10x faster on the CPU than var_mean
    # over (0, 2, 3); with eps = 0 its invstd is exactly 1 / sqrt(biased var).
    _, mean_r, invstd_r = torch.native_batch_norm(x.to(stat_dtype), None, None, None, None, True, 0.0, 0.0)
    var_r = invstd_r.pow(-2)
    local = torch.stack([mean_r, var_r * n])
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    stats = torch.stack(parts)  # [world, 2, C]
    means, m2s = stats[:, 0], stats[:, 1]
    mean = means.mean(0)
    var = (m2s.sum(0) + n * ((means - mean) ** 2).sum(0)) / (n * stats.shape[0])
    return mean, var


@_global_stats.register_fake
def _(x):
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape[1], dtype=stat_dtype), x.new_empty(x.shape[1], dtype=stat_dtype)


def _like(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`y` laid out as `torch.empty_like(x)` (the fake implementations' layout); a copy only where it differs."""
    if y.stride() == torch.empty_like(x, device="meta").stride():
        return y
    return torch.empty_like(x).copy_(y)


@torch.library.custom_op("nin_dist::cross_rank_batch_norm", mutates_args=())
def _cross_rank_batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                           var: torch.Tensor, eps: float) -> torch.Tensor:
    """Training-mode BatchNorm with the global batch's statistics, on torch's native CPU/GPU kernels.

    Forward: the global batch's statistics (`_global_stats`), then torch's own normalisation kernel with them.
    Backward (`_cross_rank_batch_norm_backward`), with x^ = (x - mean) * invstd and dy' = dy * gamma:
        dx = invstd * (dy' - S1 / N - x^ * S2 / N),  S1 = sum dy', S2 = sum dy' x^ over all ranks.
    torch's native backward computes the same with this rank's sums (s1 / n, s2 / n, its dgamma and
    dbeta are exactly those sums); one all_reduce of (dbeta, dgamma) gives the global ones, and
    dx is corrected by invstd * gamma * ((s1/n - S1/N) + x^ (s2/n - S2/N)): an affine map of x per
    channel. dgamma / dbeta stay this rank's, as DDP averages parameter gradients itself.
    """
    y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return _like(x, y)


@_cross_rank_batch_norm.register_fake
def _(x, weight, bias, mean, var, eps):
    return torch.empty_like(x)


@torch.library.custom_op("nin_dist::cross_rank_batch_norm_backward", mutates_args=())
def _cross_rank_batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                                    var: torch.Tensor, eps: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    invstd = torch.rsqrt(var + eps)
    dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        dy, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
    local = torch.stack([dbias, dweight]).to(mean.dtype)
    sums = local.clone()
    dist.all_reduce(sums)
    n = x.numel() // x.shape[1]
    total = n * dist.get_world_size()
    shift = local / n - sums / total  # [2, C]: (s1/n - S1/N, s2/n - S2/N)
    gain = weight.to(mean.dtype) * invstd
    slope = gain * invstd * shift[1]  # coefficient of x
    offset = gain * shift[0] - slope * mean
    # x * slope + offset per channel, on torch's eval BatchNorm kernel (mean 0, var 1, eps 0): one
    # pass in any memory format, where broadcasting views cost ~10x more on the CPU.
    ones = torch.ones_like(mean)
    dx = dx + torch.batch_norm(x, slope, offset, torch.zeros_like(mean), ones, False, 0.0, 0.0, False)
    return _like(x, dx), dweight, dbias


@_cross_rank_batch_norm_backward.register_fake
def _(dy, x, weight, mean, var, eps):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _save_for_backward(ctx, inputs, output):
    x, weight, _, mean, var, eps = inputs
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps


def _batch_norm_backward(ctx, dy):
    x, weight, mean, var = ctx.saved_tensors
    dx, dweight, dbias = _cross_rank_batch_norm_backward(dy, x, weight, mean, var, ctx.eps)
    return dx, dweight, dbias, None, None, None


_cross_rank_batch_norm.register_autograd(_batch_norm_backward, setup_context=_save_for_backward)


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across all ranks.

    In a world of one it is torch's BatchNorm2d. Across ranks: one all_gather of per-rank
    statistics in the forward and one all_reduce of two per-channel sums in the backward, around
    torch's own kernels (see `_cross_rank_batch_norm`). Every rank must hold the same number of
    images, as `TrainBatches` guarantees.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not _distributed():
            # A world of one: the global batch is this batch, and torch's fused kernel is faster.
            return super().forward(x)
        mean, var = _global_stats(x.detach())
        total = x.numel() // x.shape[1] * dist.get_world_size()
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
            unbiased = var * (total / max(total - 1, 1))
            self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        weight, bias = self.weight.to(mean.dtype), self.bias.to(mean.dtype)
        return _cross_rank_batch_norm(x, weight, bias, mean, var, self.eps)


def dropout_seed(seed: int, step: int) -> int:
    """The dropout mask's seed for one step: its own stream, apart from the data order's (seed, epoch)."""
    return ((seed + 1) * 0x9E3779B1 + 7919 * step + 1) % 2**64  # torch takes seeds < 2**64


class GlobalBatchDropout(nn.Dropout):
    """Dropout with one mask per global batch; each rank applies its own rows of it.

    The trainer calls `set_rows(offset, global_rows, seed)` before each step; without that call (or
    in eval mode) it is plain nn.Dropout.
    """

    def __init__(self, p: float = 0.5):
        super().__init__(p)
        self._rows: tuple[int, int] | None = None  # (offset, global_rows): the same at every step
        self._seed: torch.Tensor | None = None

    def set_rows(self, offset: int, global_rows: int, seed: int) -> None:
        self._rows = (offset, global_rows)
        # The seed changes every step: a tensor, so a compiled graph takes it as an input. As an int
        # it would be guarded on, and every step would compile the model again. An op's integer is
        # an int64 and the seed is below 2**64: the same bits, signed (`_keep_mask` undoes it).
        self._seed = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or self._rows is None:
            return super().forward(x)
        # x gives the mask's shape, dtype and device only: no gradient flows through a mask.
        return x * _keep_mask(x.detach(), self.p, *self._rows, self._seed)


@torch.library.custom_op("nin_dist::global_batch_keep_mask", mutates_args=())
def _keep_mask(x: torch.Tensor, p: float, offset: int, global_rows: int, seed: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the global batch's mask, already scaled by 1 / (1 - p)."""
    gen = torch.Generator(device=x.device).manual_seed(int(seed) % 2**64)
    noise = torch.rand((global_rows, *x.shape[1:]), generator=gen, device=x.device)
    keep = noise[offset: offset + x.shape[0]] >= p
    return keep.to(x.dtype) * (1.0 / (1.0 - p))


@_keep_mask.register_fake
def _(x, p, offset, global_rows, seed):
    return x.new_empty(x.shape)  # contiguous, as the slice of `noise` is
