"""Triton kernels for nin-dist. A leaf package: it imports torch and triton, never nin_dist.

``fused_pointwise_mlp(x, w1, b1, w2, b2, relu_input=True)`` computes a NiN block's
``relu(conv1x1(relu(conv1x1(relu(x)))))`` tail in one kernel (``pointwise_mlp.py`` has the maths and
the tiling); ``reference_pointwise_mlp`` is the same in plain PyTorch.
"""

from .ops import fused_pointwise_mlp, reference_pointwise_mlp

__all__ = ["fused_pointwise_mlp", "reference_pointwise_mlp"]
