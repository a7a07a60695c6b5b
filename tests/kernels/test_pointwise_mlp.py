"""kernels.fused_pointwise_mlp against nn.Conv2d(k=1) + nn.ReLU in float64.

On a CPU the kernels run under the Triton interpreter (conftest.py sets TRITON_INTERPRET=1), so
sizes stay tiny: 20-70 pixels, never a multiple of the 32-pixel interpreter tile. The reference is
built here from torch.nn (https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html), not from
kernels.reference_pointwise_mlp. Both paths get clones of one input and one upstream gradient, and
the output and all five gradients are compared.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from kernels import aot, fused_pointwise_mlp, ops, pointwise_mlp, reference_pointwise_mlp
from nin_dist.config import load_config
from nin_dist.shapes import NUM_CLASSES, feature_sizes

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GRAD_NAMES = ("dx", "dw1", "db1", "dw2", "db2")

if not CUDA and not ops.INTERPRETED:
    raise RuntimeError("triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
                       "export TRITON_INTERPRET=1 to run the kernel tests on a CPU")

# (dtype, atol, rtol) rows. The float64 reference sees the same rounded inputs; for 16-bit dtypes it
# also rounds h to the dtype, as the kernel (and PyTorch's own 16-bit conv) does, so the ReLU masks
# agree and what remains is rounding, not a flipped mask.
FP32 = pytest.param(
    # fp32 with fp32 accumulation over at most 512 channels or 70 pixels: each output is a sum of
    # O(1) terms with ~sqrt(K)·6e-8 relative error, measured below 3e-6 absolute on values up to 20;
    # rtol carries the large entries and atol=1e-5 the ones near zero, where relative error is moot
    torch.float32, 1e-5, 1e-5, id="fp32")
FP16 = pytest.param(
    # fp16 keeps 11 bits (eps 9.8e-4); dz1 is rounded to fp16 before the dW1 and dx GEMMs, as in
    # PyTorch, which costs up to ~2.5e-3 absolute on dW1 entries near 10: 2x margin
    torch.float16, 5e-3, 5e-3, id="fp16")
BF16 = pytest.param(
    # bf16 keeps 8 bits (eps 7.8e-3), 8x coarser than fp16; GPU only (the interpreter has no bf16)
    torch.bfloat16, 4e-2, 2e-2, id="bf16", marks=pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 rows expect IEEE fp32; on a GPU the op follows cuDNN, whose default is TF32."""
    conv = torch.backends.cudnn.conv
    old = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = old


class RoundTo(nn.Module):
    """Rounds to a dtype in the forward and passes the gradient through unchanged."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t + (t.to(self.dtype).to(t.dtype) - t).detach()


def ref_block(C: int, relu_input: bool, hidden_dtype: torch.dtype) -> nn.Sequential:
    """The NiN block's tail as torch.nn layers, in float64."""
    layers = [nn.ReLU()] if relu_input else []
    layers += [nn.Conv2d(C, C, kernel_size=1), nn.ReLU()]
    if hidden_dtype in (torch.float16, torch.bfloat16):
        layers.append(RoundTo(hidden_dtype))
    layers += [nn.Conv2d(C, C, kernel_size=1), nn.ReLU()]
    return nn.Sequential(*layers).double()


def make_inputs(N: int, C: int, H: int, W: int, dtype=torch.float32, device=DEVICE):
    """x, the four parameters (nn.Conv2d's default init) and dy, rounded to dtype."""
    conv1, conv2 = nn.Conv2d(C, C, 1), nn.Conv2d(C, C, 1)
    params = [p.detach() for p in (conv1.weight, conv1.bias, conv2.weight, conv2.bias)]
    x, dy = torch.randn(N, C, H, W), torch.randn(N, C, H, W)
    return (x.to(device, dtype), [p.to(device, dtype) for p in params], dy.to(device, dtype))


def fp64_backward(block, x, params, dy):
    """(y, [dx, dw1, db1, dw2, db2]) of `block` (float64, two 1x1 convs) with `params` in its convs, on
    float64 copies of x and dy."""
    convs = [m for m in block if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, (w, b) in zip(convs, (params[:2], params[2:]), strict=True):
            conv.weight.copy_(w.double())
            conv.bias.copy_(b.double())
    xr = x.detach().double().requires_grad_()
    y = block(xr)
    y.backward(dy.double())
    return y, [xr.grad, convs[0].weight.grad, convs[0].bias.grad, convs[1].weight.grad, convs[1].bias.grad]


def reference(x, params, dy, relu_input=True):
    """(y, [dx, dw1, db1, dw2, db2]) from ref_block in float64 on copies of the inputs."""
    return fp64_backward(ref_block(x.shape[1], relu_input, x.dtype).to(x.device), x, params, dy)


def fused(x, params, dy, relu_input=True):
    """(y, [dx, dw1, db1, dw2, db2]) from the fused op on clones of the inputs."""
    xs = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    y = fused_pointwise_mlp(xs, *ps, relu_input=relu_input)
    y.backward(dy)
    return y, [xs.grad, *(p.grad for p in ps)]


def assert_matches(ours, ref, atol, rtol):
    (y, grads), (y_ref, grads_ref) = ours, ref
    torch.testing.assert_close(y, y_ref.to(y.dtype), atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")
    for name, g, g_ref in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref.to(g.dtype), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------
# Numerics on the interpreter (or the GPU when there is one)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", [FP32])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize(
    "C, N, H, W",
    [
        (96, 2, 5, 7),  # NiN's channel counts; 70 pixels = 2 tiles of 32 + 6
        (256, 2, 5, 7),
        (384, 1, 3, 7),  # 21 pixels: less than one tile; 384 = 6 hidden chunks of 64
        (10, 2, 5, 7),
        (3, 2, 5, 7),  # ragged: C far below the 16-wide dot minimum
        (17, 1, 4, 5),  # ragged: one channel past a power of two
        (100, 3, 3, 5),  # ragged: a 64 + 36 channel split
    ],
)
def test_matches_conv_reference(C, N, H, W, memory_format, dtype, atol, rtol):
    x, params, dy = make_inputs(N, C, H, W, dtype)
    x, dy = x.to(memory_format=memory_format), dy.to(memory_format=memory_format)
    ours = fused(x, params, dy)
    assert ours[0].is_contiguous(memory_format=memory_format) and ours[1][0].is_contiguous(memory_format=memory_format)
    assert_matches(ours, reference(x, params, dy), atol, rtol)


# views a caller may pass: each is an [N, C, H, W] tensor that is neither NCHW nor channels_last
VIEWS = {
    "crop": lambda t: t[:, :, 1:-1, 2:],  # rows of the image are not contiguous: copied
    "transposed": lambda t: t.transpose(2, 3),  # w before h in memory: copied
    "channel_slice_cl": lambda t: t.to(memory_format=torch.channels_last)[:, 1:-1],  # pixel stride C + 2
    "batch_slice": lambda t: t[::2],  # images not adjacent: read image by image
}


@pytest.mark.parametrize("dtype, atol, rtol", [FP32])
@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("C", [96, 17])
def test_strided_views(C, view, dtype, atol, rtol):
    base, params, dy = make_inputs(4, C + 2, 6, 8, dtype)
    x = VIEWS[view](base)
    C = x.shape[1]
    params = [p[:C, :C] if p.dim() == 4 else p[:C] for p in params]
    dy = torch.randn(x.shape, dtype=dtype, device=x.device)
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    assert_matches(fused(x, params, dy), reference(x, params, dy), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", [FP32])
@pytest.mark.parametrize(
    "C, N, H, W",
    [
        (10, 3, 1, 1),  # one-pixel images: NCHW and channels_last are the same memory
        (1, 2, 3, 5),  # a single channel
        (17, 2, 1, 7),  # one-row images
        (12, 0, 3, 3),  # an empty batch: y is empty, dW and db are zero
    ],
)
def test_edge_shapes(C, N, H, W, dtype, atol, rtol):
    x, params, dy = make_inputs(N, C, H, W, dtype)
    assert_matches(fused(x, params, dy), reference(x, params, dy), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", [FP32])
@pytest.mark.parametrize("C", [96, 17])
def test_without_input_relu(C, dtype, atol, rtol):
    x, params, dy = make_inputs(2, C, 3, 5, dtype)
    ours = fused(x, params, dy, relu_input=False)
    assert_matches(ours, reference(x, params, dy, relu_input=False), atol, rtol)
    assert (ours[1][0] != 0).float().mean() > 0.9  # no [x > 0] mask: negative x get gradient too


@pytest.mark.parametrize("dtype, atol, rtol", [FP32])
def test_upstream_gradient_layouts(dtype, atol, rtol):
    """dy broadcast from a sum (all strides 0) or in the other memory format than y."""
    x, params, _ = make_inputs(2, 24, 5, 7, dtype)
    ones = torch.ones(x.shape, dtype=dtype, device=x.device)
    xs = x.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    fused_pointwise_mlp(xs, *ps).sum().backward()  # dy = ones, expanded: strides (0, 0, 0, 0)
    ref_grads = reference(x, params, ones)[1]
    for name, g, g_ref in zip(GRAD_NAMES, [xs.grad, *(p.grad for p in ps)], ref_grads, strict=True):
        torch.testing.assert_close(g, g_ref.to(dtype), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    dy_cl = torch.randn(x.shape, dtype=dtype, device=x.device).to(memory_format=torch.channels_last)
    assert_matches(fused(x, params, dy_cl), reference(x, params, dy_cl), atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", [FP16, BF16])
@pytest.mark.parametrize("C, N, H, W", [(96, 2, 5, 7), (10, 2, 5, 7)])
def test_16bit(C, N, H, W, dtype, atol, rtol):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("bf16 needs a GPU: the Triton interpreter has no bf16 dot")
    x, params, dy = make_inputs(N, C, H, W, dtype)
    assert_matches(fused(x, params, dy), reference(x, params, dy), atol, rtol)


@pytest.mark.parametrize("relu_input", [True, False])
def test_nan_propagates_as_nn_relu(relu_input):
    """A NaN in x reaches y and the gradients exactly where nn.ReLU sends it: y is NaN at its pixel
    (all channels), dW1's column and all of dW2 turn NaN, and dx stays finite, since a ReLU's backward
    passes the gradient of a NaN output on. tl.maximum's default would have made that pixel's y finite."""
    x, params, dy = make_inputs(1, 16, 2, 3)
    x[0, 5, 1, 2] = float("nan")
    ours, ref = fused(x, params, dy, relu_input), reference(x, params, dy, relu_input)
    assert ours[0][0, :, 1, 2].isnan().all() and ours[0].isnan().sum() == 16
    for name, g, g_ref in zip(("y", *GRAD_NAMES), (ours[0], *ours[1]), (ref[0], *ref[1]), strict=True):
        torch.testing.assert_close(g, g_ref.to(g.dtype), atol=1e-5, rtol=1e-5, equal_nan=True,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_gradcheck_float64():
    """Finite differences through the op (fp64 runs the same kernels, accumulating in fp64)."""
    x, params, _ = make_inputs(1, 5, 2, 3, torch.float64)
    # keep pre-activations away from ReLU's kink, where finite differences are meaningless
    x = torch.where(x.abs() < 0.1, x.sign() * 0.1 + x, x)
    inputs = [t.clone().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(lambda *t: fused_pointwise_mlp(*t), inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both ops."""
    x, params, dy = make_inputs(2, 17, 3, 5, torch.float32)
    x = x.to(memory_format=torch.channels_last)
    fwd_args = (x.requires_grad_(), *(p.requires_grad_() for p in params), True)
    torch.library.opcheck(torch.ops.nin_kernels.fused_pointwise_mlp.default, fwd_args)
    y = fused_pointwise_mlp(*fwd_args).detach()
    bwd_args = (dy, x.detach(), params[0].detach(), params[1].detach(), params[2].detach(), y, True)
    torch.library.opcheck(torch.ops.nin_kernels.fused_pointwise_mlp_backward.default, bwd_args)


def test_backward_is_deterministic():
    """Two backward passes give bitwise-identical weight and bias gradients (no float atomics).

    70 pixels in tiles of 32 give 3 tiles, so the dW reduction runs over 3 pixel splits.
    """
    x, params, dy = make_inputs(2, 96, 5, 7)
    first = fused(x, params, dy)[1]
    second = fused(x, params, dy)[1]
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), f"{name} differs between two identical backward passes"


def test_backward_grid_order_changes_no_bit():
    """The backward's chunk-fastest grid gives the very bits of the order it replaced (each pixel tile
    of a chunk before the next chunk). NCHW keeps images apart, so all three indices are in play:
    2 images of 36 pixels (2 tiles of 32 each) and C = 72 (chunks of 64 and 8)."""
    x, params, dy = make_inputs(2, 72, 4, 9)
    w1, b1, w2, b2 = params
    y = pointwise_mlp.forward(x, w1, b1, w2, b2, True, ops.select_plan(x))
    plan = ops.select_plan(x)
    new = pointwise_mlp.backward(dy, x, w1, b1, w2, y, True, plan)
    old = pointwise_mlp.backward(dy, x, w1, b1, w2, y, True, plan, chunks_fastest=False)
    for name, a, b in zip(GRAD_NAMES, new, old, strict=True):
        assert torch.equal(a, b), f"{name}: the grid order changed the result"


def test_padded_weight_copy_is_reused_until_the_weight_changes():
    """C = 10 pads the weights to 16 columns: the backward reuses its forward's copy while the weight
    is unchanged; an in-place update (an optimizer step), a new storage, or a write through .data
    (which bumps no version counter, so only a new forward sees it) gives a fresh copy. The copy goes
    when the weight does."""
    as_matrix = pointwise_mlp._as_matrix
    w = torch.randn(10, 10, 1, 1)
    first = as_matrix(w)
    assert as_matrix(w, for_backward=True) is first
    with torch.no_grad():
        w.add_(1.0)
    assert as_matrix(w, for_backward=True) is not first
    w.data = torch.randn(10, 10, 1, 1)
    assert torch.equal(as_matrix(w, for_backward=True)[:, :10], w.reshape(10, 10))
    as_matrix(w)
    w.data[0, 0] += 1.0
    fresh = as_matrix(w)
    assert torch.equal(fresh[:, :10], w.reshape(10, 10)) and not fresh[:, 10:].any()
    key = id(w)
    del w
    assert key not in pointwise_mlp._PADDED


def test_training_steps_see_updated_padded_weights():
    """Two SGD steps on a C = 10 block: each step's gradients are those of the weights after the last
    update, not of a cached copy of older ones."""
    x, params, dy = make_inputs(1, 10, 2, 3)
    xs, ps = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD([xs, *ps], lr=0.5)
    for _ in range(2):
        ref = reference(xs.detach(), [p.detach() for p in ps], dy)
        opt.zero_grad()
        y = fused_pointwise_mlp(xs, *ps)
        y.backward(dy)
        assert_matches((y, [xs.grad, *(p.grad for p in ps)]), ref, 1e-5, 1e-5)
        opt.step()


def test_reference_function_matches_modules():
    x, params, dy = make_inputs(2, 10, 3, 4, torch.float64)
    y_ref, _ = reference(x, params, dy)
    torch.testing.assert_close(reference_pointwise_mlp(x, *params), y_ref, atol=0, rtol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, p: (x[0], p), "x must be [N, C, H, W]"),
        (lambda x, p: (x, [p[0][:, :4], *p[1:]]), "w1 and w2 must be [C, C, 1, 1]"),
        (lambda x, p: (x, [p[0], p[1][:4], *p[2:]]), "b1 and b2 must be [C]"),
        (lambda x, p: (x.double(), p), "need one dtype"),
        (lambda x, p: (x.int(), [t.int() for t in p]), "need one dtype"),
    ],
    ids=["x-3d", "w1-shape", "b1-shape", "mixed-dtype", "int"],
)
def test_rejects_bad_inputs(change, message):
    x, params, _ = make_inputs(1, 8, 2, 3)
    x, params = change(x, params)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        fused_pointwise_mlp(x, *params)
    assert str(tuple(x.shape)) in str(info.value)  # the message names the shapes


def test_rejects_too_many_channels():
    x, params, _ = make_inputs(1, 513, 1, 1)
    with pytest.raises(ValueError, match=r"C must be in \[1, 512\]"):
        fused_pointwise_mlp(x, *params)


# ---------------------------------------------------------------------------------------------
# Package rules and the ahead-of-time compile
# ---------------------------------------------------------------------------------------------


def test_kernels_is_a_leaf_package():
    """kernels/ imports the standard library, torch, triton and itself: never nin_dist."""
    allowed = set(sys.stdlib_module_names) | {"torch", "triton", "kernels"}
    files = sorted((REPO / "kernels").glob("*.py"))
    assert files, "no kernels/*.py found"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name}:{node.lineno} imports {name}"


def test_gpu_tables_give_every_dot_power_of_two_blocks_of_16():
    """Every block size of a GPU variant is a tl.dot dimension (the reduce kernel has no dot); on a GPU,
    triton 3.6 and 3.7 refuse K < 16 even for fp32, and every release wants powers of two."""
    for v in ops.gpu_variants():
        if v.kernel == "_bwd_reduce_kernel":
            continue
        for name, value in v.constexprs:
            if name.startswith("BLOCK_"):
                assert value >= 16 and value & (value - 1) == 0, f"{v.kernel} {v.dtype} {name}={value}"


def test_version_floor_reads_release_numbers():
    assert kernels._release("2.11.0+cu128") == (2, 11) and kernels._release("3.6.0") == (3, 6)
    assert kernels._release(torch.__version__) >= kernels.MIN_TORCH


def test_aot_compiles_the_launches_with_the_jits_specializations():
    """kernels.aot's NiN set records each launch of the launchers (on meta tensors) and specializes its
    int arguments as triton's JIT does: a block of one channel chunk gets CHUNKS and STEP_T as
    constants, which the table's general variants never had."""
    assert [aot.jit_specialization(v) for v in (1, 0, 48, 17, 2**31 + 16)] == ["constexpr", "D", "D", "", "i64 D"]
    for v in (*range(-20, 70), 2**31 - 1, 2**31, -2**31 - 1):  # the fallback rule agrees with triton's own
        assert aot.written_rule(v) == aot.jit_specialization(v), v
    found = aot.launch_variants([(32, 5)], batches=(128,), dtypes=[(torch.bfloat16, False)])
    hidden = {v.layout: v for v in found if v.kernel == "_bwd_hidden_kernel"}
    assert set(hidden["channels_last"].unit_strides) == {"CHUNKS", "STEP_T", "STEP_C", "stride_xc", "stride_yc"}
    assert "HW" in hidden["channels_last"].divisible and "TILES_PER_IMAGE" in hidden["nchw"].unit_strides
    assert found[hidden["nchw"]] == ["C32 5x5 N128 nchw"]
    dw = {v.layout for v in found if v.kernel == "_bwd_dw_kernel"}
    assert dw == {"channels_last", "nchw"}  # an NCHW backward's dW2 reads the channels_last h buffer
    assert set(found) & set(ops.gpu_variants()) == set()
    assert aot.launch_variants([(10, 5)]) == {}  # cuDNN runs the 10-channel head: no launch to compile
    blocks = set()  # kernels.aot's NiN blocks are those the training configs build
    for name in ("d2l", "fast"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        sides = feature_sizes(cfg.model.stem, cfg.data.resize)[0::2]
        blocks |= set(zip((*cfg.model.block_widths, NUM_CLASSES), sides, strict=True))
    assert blocks == set(aot.NIN_BLOCKS)


@pytest.mark.slow
def test_aot_compiles_every_variant(tmp_path):
    """python -m kernels.aot --set nin: every kernel the NiN shapes launch (batch 128 and 256, bf16,
    fp16, TF32, both layouts, with the JIT's specializations of their actual arguments) compiles for
    sm_90 (no GPU needed), its dots use wgmma, nothing spills, shared memory fits. About a minute on
    2 cores. sm_90 is the H100/H200 this project trains on; .ci/run compiles the table's general
    variants for sm_90 and both sets for sm_80 with this Triton, and both with the other Tritons the
    project meets (3.6, 3.7, 3.9)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "kernels.aot", "--arch", "90", "--set", "nin", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["failures"] == [] and all("error" not in r for r in rows)
    assert {r["arch"] for r in rows} == {"sm_90"}
    assert {r["kernel"] for r in rows} == {"_fwd_kernel", "_bwd_hidden_kernel", "_bwd_dx_kernel", "_bwd_dw_kernel",
                                           "_bwd_reduce_kernel"}
    launched = {" ".join(label.split()[:3:2]) for r in rows for label in r["launched_by"]}
    assert launched == {f"C{c} N{n}" for c in (96, 256, 384) for n in (128, 256)}  # C=10 runs on cuDNN
    dots = [r for r in rows if r["kernel"] != "_bwd_reduce_kernel"]
    assert dots and all(r["wgmma"] > 0 for r in dots)
    assert max(r["spill_bytes"] for r in rows) == 0


# ---------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------


NIN_SHAPES = [(96, 8, 54, 54), (256, 8, 26, 26), (384, 8, 12, 12), (10, 8, 5, 5)]  # batch 8 of NiN's blocks


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "dtype, precision, atol, rtol",
    [
        pytest.param(torch.float32, "ieee", 1e-5, 1e-5, id="fp32"),  # as FP32 above
        # TF32 (what cuDNN's fp32 convs use by default) keeps 10 bits inside each dot: eps 4.9e-4
        pytest.param(torch.float32, "tf32", 1e-2, 1e-2, id="tf32"),
        pytest.param(torch.float16, "ieee", 5e-3, 5e-3, id="fp16"),  # as FP16 above
        pytest.param(torch.bfloat16, "ieee", 4e-2, 2e-2, id="bf16"),  # as BF16 above
    ],
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("C, N, H, W", NIN_SHAPES)
def test_gpu_output_matches_conv_reference(C, N, H, W, memory_format, dtype, precision, atol, rtol):
    """y elementwise at NiN's shapes (a ReLU is continuous, so a mask flipped by rounding moves y by no
    more than the rounding); the gradients, which a flip moves by ~2e-2, are test_gradient_check's."""
    x, params, _ = make_inputs(N, C, H, W, dtype)
    x = x.to(memory_format=memory_format)
    old = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = precision  # the op follows PyTorch's conv setting
    try:
        with torch.no_grad():
            y = fused_pointwise_mlp(x, *params)
        y_ref = ref_block(C, True, dtype).to(x.device)
        convs = [m for m in y_ref if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            for conv, (w, b) in zip(convs, (params[:2], params[2:]), strict=True):
                conv.weight.copy_(w.double())
                conv.bias.copy_(b.double())
            y_ref = y_ref(x.double())
    finally:
        torch.backends.cudnn.conv.fp32_precision = old
    torch.testing.assert_close(y, y_ref.to(dtype), atol=atol, rtol=rtol, msg=lambda m: f"y: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_opcheck_and_compile():
    """The triton_op path: opcheck, then torch.compile of a function using the op matches eager."""
    x, params, dy = make_inputs(4, 96, 9, 9, torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.nin_kernels.fused_pointwise_mlp.default,
                          (x.requires_grad_(), *(p.requires_grad_() for p in params), True))
    eager = fused(x, params, dy)
    compiled_fn = torch.compile(lambda *t: fused_pointwise_mlp(*t), fullgraph=True)
    xs = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() for p in params]
    y = compiled_fn(xs, *ps)
    y.backward(dy)
    # the same kernels and configs run under Inductor: agreement to bf16's default tolerance
    torch.testing.assert_close(y, eager[0])
    for name, g, g_eager in zip(GRAD_NAMES, [xs.grad, *(p.grad for p in ps)], eager[1], strict=True):
        torch.testing.assert_close(g, g_eager, msg=lambda m, n=name: f"{n}: {m}")
