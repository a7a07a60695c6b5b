"""The network's arithmetic, from the config's numbers alone: feature sizes, smallest input,
parameters, FLOPs.

Standard library only, so `nin_dist.config` can check a resize against the network without
importing torch. `nin_dist.model` builds the layers these numbers describe, and
tests/test_model.py checks them against the real module (shapes, and FLOPs counted by hooks).
"""

from __future__ import annotations

from nin_dist.errors import ConfigError

NUM_CLASSES = 10
SEED_WIDTHS = (96, 256, 384)  # the seed's block widths; the last block has NUM_CLASSES channels
POOL_KERNEL, POOL_STRIDE = 3, 2
LATER_KERNELS = (5, 3, 3)  # the seed's blocks 2-4: k x k convs that keep the size (padding k // 2)

Stem = tuple[int, int, int]  # the first block's conv: (kernel size, stride, padding), pixels


def block_widths(width: float, widths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Channels of blocks 1-3: `widths` where given (model.widths), else the multiplier `width` on the
    seed's (at least one each)."""
    if widths is not None:
        return tuple(widths)
    return tuple(max(1, round(c * width)) for c in SEED_WIDTHS)


def feature_sizes(stem: Stem, size: int) -> list[int] | None:
    """Spatial side after each of the 7 spatial layers (blocks and pools), or None if it vanishes."""
    kernel, stride, padding = stem
    sizes = []
    side = (size + 2 * padding - kernel) // stride + 1
    for _ in range(3):
        if side < 1:
            return None
        sizes.append(side)  # block output (blocks 2-4 keep the size: odd k x k, padding k // 2)
        side = (side - POOL_KERNEL) // POOL_STRIDE + 1
        if side < 1:
            return None
        sizes.append(side)
    sizes.append(side)  # last block
    return sizes


def smallest_input_size(stem: Stem, limit: int = 4096) -> int:
    """Smallest square input side that survives every conv and pool of the network."""
    for size in range(1, limit + 1):
        if feature_sizes(stem, size) is not None:
            return size
    raise ConfigError(f"model.stem_*: no input up to {limit} pixels fits this stem")


def parameter_count(widths: tuple[int, ...], kernels: tuple[int, ...], stem_kernel: int,
                    batchnorm: bool = False) -> int:
    """Weights and biases of the network with blocks 1-3 of `widths` channels and blocks 2-4's k x k
    convs of `kernels` (BatchNorm's scale and shift included, not its running stats)."""
    widths = (*widths, NUM_CLASSES)
    in_channels = (1, *widths[:3])
    total = 0
    for cin, cout, k in zip(in_channels, widths, (stem_kernel, *kernels), strict=True):
        total += cout * (cin * k * k + 1) + 2 * cout * (cout + 1)  # k x k conv + two 1x1 convs
        total += 2 * cout if batchnorm else 0
    return total


def flops_per_image(widths: tuple[int, ...], kernels: tuple[int, ...], stem: Stem, size: int) -> float:
    """Forward FLOPs (2 per multiply-add) of every conv for one size x size image (widths and
    kernels as `parameter_count` takes them)."""
    widths = (*widths, NUM_CLASSES)
    in_channels = (1, *widths[:3])
    block_sides = feature_sizes(stem, size)[0::2]  # outputs of blocks 1-4
    total = 0.0
    for cin, cout, k, side in zip(in_channels, widths, (stem[0], *kernels), block_sides, strict=True):
        total += 2 * side * side * cout * (cin * k * k + 2 * cout)  # k x k conv + two 1x1 convs
    return total
