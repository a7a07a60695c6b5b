"""Full-size gradient checks that a ReLU mask flip cannot fail and a wrong kernel cannot pass.

The kernel accumulates in fp32 and the reference in fp64, so a pre-activation within rounding of 0
may be positive for one and not the other: a flipped mask. At NiN's sizes a case has ~0.2-1 of
them, and one moves a pixel's dx by ~2e-2, so elementwise tolerances fail a correct kernel there.
Two changes remove that: the fp64 reference (nn.Conv2d in float64, as in test_pointwise_mlp) takes
its two inner ReLU masks from the kernel's own y and h, and gradients are compared by relative
norm error, ‖g − g_ref‖ / ‖g_ref‖, with a bound per dtype. The interpreter tests below show both
halves: engineered near-zero pre-activations flip masks yet pass, and a kernel with a wrong mask
fails. The GPU test runs the same check at NiN's shapes.
"""

import pytest
import torch
import triton
import triton.language as tl
from test_pointwise_mlp import (
    CUDA,
    GRAD_NAMES,
    NIN_SHAPES,
    _fp32_without_tf32,  # noqa: F401  (autouse: fp32 rows mean IEEE fp32)
    assert_matches,
    fp64_backward,
    fused,
    make_inputs,
    reference,
)
from torch import nn

from kernels import fused_pointwise_mlp, pointwise_mlp

# relative norm error bounds: each is ~10x the rounding of the gradient's inputs (unit roundoff u),
# since with the kernel's masks nothing but rounding is left
NORM_TOL = {
    "ieee": 1e-4,  # fp32 (u = 6e-8) summed over up to 23k pixels: measured ~1e-6 here
    "tf32": 5e-3,  # TF32 rounds x and W to 10 bits inside each dot (u = 4.9e-4)
    torch.float16: 5e-3,  # h, dz1, dz2 are rounded to fp16 (u = 4.9e-4) before the weight GEMMs
    torch.bfloat16: 4e-2,  # as fp16 with 8 bits (u = 3.9e-3)
}


class MaskedReLU(nn.Module):
    """A ReLU whose mask is given: the kernel's, so both paths agree on which units are active."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.mask


def kernel_hidden(x, params, relu_input=True):
    """The kernel's own h: the forward with W2 = I and b2 = 0 gives relu(I·h) = h exactly (h ≥ 0 is
    rounded to x's dtype before the second GEMM, and one nonzero product per sum is exact)."""
    w1, b1, _, b2 = params
    C = x.shape[1]
    eye = torch.eye(C, dtype=x.dtype, device=x.device).reshape(C, C, 1, 1)
    with torch.no_grad():
        return fused_pointwise_mlp(x, w1, b1, eye, torch.zeros_like(b2), relu_input)


def reference_with_kernel_masks(x, params, dy, y, h, relu_input=True):
    """fp64 gradients of nn.ReLU -> nn.Conv2d -> ReLU -> nn.Conv2d -> ReLU, the inner two ReLUs
    masked by [h > 0] and [y > 0] from the kernel's h and y."""
    C = x.shape[1]
    layers = [nn.ReLU()] if relu_input else []
    layers += [nn.Conv2d(C, C, 1), MaskedReLU((h > 0).double()), nn.Conv2d(C, C, 1), MaskedReLU((y > 0).double())]
    return fp64_backward(nn.Sequential(*layers).double().to(x.device), x, params, dy)[1]


def assert_gradients_close(grads, grads_ref, tol):
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        error = ((g.double() - g_ref).norm() / g_ref.norm()).item()
        assert error < tol, f"{name}: relative norm error {error:.2e} over the bound {tol:.0e}"


def check_gradients(x, params, dy, tol, relu_input=True):
    """The kernel's gradients against the fp64 reference with the kernel's masks."""
    y, grads = fused(x, params, dy, relu_input)
    h = kernel_hidden(x, params, relu_input)
    assert_gradients_close(grads, reference_with_kernel_masks(x, params, dy, y, h, relu_input), tol)


def near_zero_hidden_inputs(C=16):
    """Inputs whose hidden pre-activations z1 = relu(x)·W1ᵀ + b1 are 0 in fp64 at one pixel per hidden
    channel (b1 cancels the fp64 product there): fp32 and fp64 then disagree on the sign at random."""
    x, params, dy = make_inputs(1, C, 4, 4)
    w1, b1, w2, b2 = params
    a = x.double().clamp_min(0).permute(0, 2, 3, 1).reshape(-1, C)  # [pixels, C]
    z = a @ w1.double().reshape(C, C).T  # [pixels, hidden]
    b1 = -z[torch.arange(C) % a.shape[0], torch.arange(C)].float()  # hidden channel j cancels at pixel j
    return x, [w1, b1, w2, b2], dy


def test_a_flipped_mask_fails_elementwise_but_not_this_check():
    x, params, dy = near_zero_hidden_inputs()
    h = kernel_hidden(x, params)
    z1_ref = nn.functional.conv2d(x.double().clamp_min(0), params[0].double(), params[1].double())
    flips = int(((h > 0) != (z1_ref > 0)).sum())
    assert flips > 0, "the engineered inputs flipped no mask: the test proves nothing"
    with pytest.raises(AssertionError):  # the elementwise check with the plain fp64 reference
        assert_matches(fused(x, params, dy), reference(x, params, dy), 1e-5, 1e-5)
    check_gradients(x, params, dy, NORM_TOL["ieee"])


@triton.jit
def _relu_grad_leaky_at_zero(g, out, floor):
    return tl.where(out < floor, 0.0, g)  # wrong: a ReLU whose output is exactly 0 passes g on


@pytest.mark.skipif(CUDA, reason="patches a jit helper, which only the interpreter looks up at every call")
def test_a_wrong_mask_fails_this_check(monkeypatch):
    """The classic `>=` for `>` in a ReLU's backward, patched into the interpreted kernels."""
    x, params, dy = make_inputs(2, 24, 3, 5)
    check_gradients(x, params, dy, NORM_TOL["ieee"])  # the real kernel passes
    monkeypatch.setattr(pointwise_mlp, "_relu_grad", _relu_grad_leaky_at_zero)
    with pytest.raises(AssertionError, match="relative norm error"):
        check_gradients(x, params, dy, NORM_TOL["ieee"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "dtype, precision",
    [(torch.float32, "ieee"), (torch.float32, "tf32"), (torch.float16, "ieee"), (torch.bfloat16, "ieee")],
    ids=["fp32", "tf32", "fp16", "bf16"],
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("C, N, H, W", NIN_SHAPES)
def test_gpu_full_size_gradients(C, N, H, W, memory_format, dtype, precision):
    x, params, dy = make_inputs(N, C, H, W, dtype)
    x, dy = x.to(memory_format=memory_format), dy.to(memory_format=memory_format)
    old = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = precision  # the op follows PyTorch's conv setting
    try:
        check_gradients(x, params, dy, NORM_TOL[precision if dtype == torch.float32 else dtype])
    finally:
        torch.backends.cudnn.conv.fp32_precision = old
