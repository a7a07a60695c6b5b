"""Triton kernels for nin-dist. A leaf package: it imports torch and triton, never nin_dist.

``fused_pointwise_mlp(x, w1, b1, w2, b2, relu_input=True)`` computes a NiN block's
``relu(conv1x1(relu(conv1x1(relu(x)))))`` tail in one kernel (``pointwise_mlp.py`` has the maths and
the tiling); ``reference_pointwise_mlp`` is the same in plain PyTorch.

Needs torch >= 2.11 and triton >= 3.6: the oldest versions whose every kernel variant ``kernels.aot``
compiles and checks (CI runs it on triton 3.6 to 3.9). Older ones stop the import with one line that
says so, rather than a compile error from inside a kernel at the first launch.
"""

import re

import torch
import triton

MIN_TORCH = (2, 11)
MIN_TRITON = (3, 6)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as "2.11.0+cu128" or "3.6.0"."""
    return tuple(int(n) for n in re.findall(r"\d+", version)[:2])


if _release(torch.__version__) < MIN_TORCH or _release(triton.__version__) < MIN_TRITON:
    raise ImportError(f"kernels needs torch >= {'.'.join(map(str, MIN_TORCH))} and triton >= "
                      f"{'.'.join(map(str, MIN_TRITON))}; found torch {torch.__version__}, triton {triton.__version__}")

from .ops import fused_pointwise_mlp, reference_pointwise_mlp  # noqa: E402

__all__ = ["fused_pointwise_mlp", "reference_pointwise_mlp"]
