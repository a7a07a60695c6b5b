"""The fused 1x1-conv pair as a PyTorch operator: registration, autograd, reference and dispatch.

``nin_kernels::fused_pointwise_mlp`` is a ``torch.library.triton_op`` whose body launches the
kernels of ``pointwise_mlp`` through ``wrap_triton``, so ``torch.compile`` and DDP see one op and
Inductor sees the Triton kernels inside it. Its backward is a second op,
``nin_kernels::fused_pointwise_mlp_backward``, joined to it by ``register_autograd``.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``@triton.jit`` gives plain Python functions that
``wrap_triton`` cannot put into a graph, so there the two ops are opaque ``custom_op``s with a fake
(meta) implementation instead; the eager behaviour, schema and autograd are the same.

Dispatch: one fixed plan under the interpreter (which can neither autotune nor time anything); on
a GPU a table lookup by dtype class (16-bit, fp32 as tf32, fp32 as ieee) and by the forward's
accumulator width (64, 128, 256 or 512), each kernel with one config for aligned channels_last
launches and one for the rest. No autotuning: every config in the tables is one ``kernels.aot``
has compiled and checked (no spills, tensor cores, shared memory) for sm_80 and sm_90, and
``gpu_variants()`` lists them all. fp32 uses TF32 exactly when PyTorch's own convolutions would.
``cudnn_instead`` says which CUDA blocks the model leaves to cuDNN (too few channels, fp32 without
TF32): the "ieee" tables remain for direct calls of the op.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from triton.runtime.interpreter import InterpretedFunction

from . import pointwise_mlp
from .pointwise_mlp import ALIGNED_ARGS, ALWAYS_DIVISIBLE, UNIT_STRIDES, KernelConfig, Plan, Tiles
from .pointwise_mlp import backward as launch_backward
from .pointwise_mlp import forward as launch_forward

OP_NAME = "nin_kernels::fused_pointwise_mlp"
BACKWARD_OP_NAME = "nin_kernels::fused_pointwise_mlp_backward"

# True when TRITON_INTERPRET=1 was set before triton was imported: kernels run on CPU tensors
INTERPRETED = isinstance(pointwise_mlp._fwd_kernel, InterpretedFunction)

_cfg = KernelConfig.make

# ---------------------------------------------------------------------------------------------
# Config tables
# ---------------------------------------------------------------------------------------------


def block_channels(C: int) -> int:
    """Width of the forward's output accumulator: the next power of two ≥ max(C, 16)."""
    width = 16  # a loop rather than bit tricks, so that a symbolic C (torch.compile) works too
    while width < C:
        width *= 2
    return width


@functools.cache  # plans are frozen: one per C, built once
def _interpreter_plan(C: int) -> Plan:
    # numpy runs each tl.dot whole, so big tiles mean fewer Python-level steps; tiles of 32 pixels
    # and 64 channels still leave ragged edges at the tests' sizes (C = 96, 100, 17, ...)
    bc = block_channels(C)
    chunk = min(64, bc)

    def same(cfg):
        return Tiles(cfg, cfg)

    return Plan(
        input_precision="ieee",
        block_c=bc,
        fwd=same(_cfg(BLOCK_M=32, BLOCK_H=chunk, BLOCK_K=chunk)),
        hidden=same(_cfg(BLOCK_M=32, BLOCK_H=chunk, BLOCK_K=chunk)),
        dx=same(_cfg(BLOCK_M=32, BLOCK_I=chunk, BLOCK_K=chunk)),
        dw=same(_cfg(BLOCK_O=chunk, BLOCK_I=chunk, BLOCK_M=32)),
        reduce=_cfg(BLOCK=1024),
        dw_programs=16,  # several pixel splits even at test sizes, so the reduce is exercised
    )


# GPU configs. Each kernel has an "unaligned" config (scalar loads, each with a 64-bit address in
# registers, so smaller tiles) and an "aligned" one for channels_last tensors whose C and strides
# are multiples of 16 (vector loads). The forward's [BLOCK_M, BLOCK_C] fp32 accumulator lives in
# registers, so its tiles also shrink as BLOCK_C grows. Every entry is sized so that ptxas spills
# nothing and 16-bit/tf32 dots use wgmma on sm_90 (BLOCK_M >= 64 per 4 warps); kernels.aot checks,
# on triton 3.6 to 3.9. Every block dimension is a power of two >= 16, fp32 ones too: triton 3.6
# and 3.7 refuse a tl.dot with K < 16 whatever the dtype. The fp32 "ieee" kernels are FMA loops
# near the register limit, where ptxas differs between releases: those entries are the ones
# that spill on none of the four.
GPU_BLOCK_C = (64, 128, 256, 512)  # C <= 64 shares the 64-wide kernel: NiN's C=10 is tiny work


def _fwd(bm, bh, bk, warps):
    return _cfg(BLOCK_M=bm, BLOCK_H=bh, BLOCK_K=bk, num_warps=warps, num_stages=2)


_FWD = {  # (dtype class, BLOCK_C) -> Tiles(unaligned, aligned)
    ("16bit", 64): Tiles(_fwd(64, 32, 32, 4), _fwd(128, 64, 64, 8)),
    ("16bit", 128): Tiles(_fwd(64, 32, 32, 4), _fwd(128, 64, 64, 8)),
    ("16bit", 256): Tiles(_fwd(64, 32, 32, 8), _fwd(64, 64, 64, 8)),
    ("16bit", 512): Tiles(_fwd(64, 16, 32, 8), _fwd(64, 32, 64, 8)),
    ("tf32", 64): Tiles(_fwd(64, 32, 32, 4), _fwd(64, 32, 32, 4)),
    ("tf32", 128): Tiles(_fwd(64, 16, 32, 4), _fwd(128, 32, 32, 8)),
    ("tf32", 256): Tiles(_fwd(64, 32, 32, 8), _fwd(64, 32, 32, 8)),
    ("tf32", 512): Tiles(_fwd(64, 16, 16, 8), _fwd(64, 16, 32, 8)),
    ("ieee", 64): Tiles(_fwd(32, 32, 16, 4), _fwd(32, 32, 16, 4)),
    ("ieee", 128): Tiles(_fwd(16, 16, 16, 4), _fwd(16, 16, 16, 4)),
    ("ieee", 256): Tiles(_fwd(32, 16, 16, 4), _fwd(32, 16, 16, 4)),
    ("ieee", 512): Tiles(_fwd(16, 16, 16, 4), _fwd(16, 16, 16, 4)),
}


def _bwd(bm, bn, bk, dw, warps=4, dw_warps=4):
    bo, bi, bm_dw = dw  # dW tile rows, columns, pixels per step; wgmma wants bo >= 64
    return dict(
        hidden=_cfg(BLOCK_M=bm, BLOCK_H=bn, BLOCK_K=bk, num_warps=warps, num_stages=2),
        dx=_cfg(BLOCK_M=bm, BLOCK_I=bn, BLOCK_K=bk, num_warps=warps, num_stages=2),
        dw=_cfg(BLOCK_O=bo, BLOCK_I=bi, BLOCK_M=bm_dw, num_warps=dw_warps, num_stages=2),
    )


_BWD = {  # dtype class -> (unaligned, aligned); these kernels hold no full-width tile
    # 16-bit dW's unaligned tile is 64 wide: 32 spilled 8 bytes (at 80 registers) on sm_80 with triton
    # 3.7 in NiN's NCHW C=384 launch, where the JIT marks the tiles per split divisible by 16
    "16bit": (_bwd(64, 32, 32, (64, 64, 32)), _bwd(64, 64, 64, (64, 64, 64))),
    # tf32 dW keeps 32 columns aligned too: 64 spilled 20 bytes on sm_80 with triton 3.6 in the NiN
    # launches (kernels.aot --set nin), whose strides the JIT marks divisible by 16
    "tf32": (_bwd(64, 32, 32, (64, 32, 32)), _bwd(64, 64, 32, (64, 32, 32))),
    "ieee": (_bwd(32, 32, 16, (32, 32, 16), dw_warps=8), _bwd(32, 32, 16, (32, 32, 16), dw_warps=8)),
}
_REDUCE = _cfg(BLOCK=1024, num_warps=4, num_stages=1)
_DW_PROGRAMS = 512  # a few waves on 108 (A100) to 132 (H100) SMs

# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def conv_allows_tf32() -> bool:
    """Whether PyTorch's fp32 convolutions may use TF32 (what cuDNN would do for nn.Conv2d)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    # the per-operator setting wins, then cuDNN's, then the global one ("none" means inherit)
    for setting in (getattr(conv, "fp32_precision", None),
                    getattr(torch.backends.cudnn, "fp32_precision", None),
                    getattr(torch.backends, "fp32_precision", None)):
        if setting in ("tf32", "ieee"):
            return setting == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _dtype_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


MIN_TENSOR_CORE_CHANNELS = 16  # a tl.dot's smallest K and N: fewer channels are mostly padding


def cudnn_instead(C: int, dtype: torch.dtype, allow_tf32: bool) -> str | None:
    """Why a CUDA block of C channels in `dtype` should run as PyTorch's convolutions (cuDNN), or None
    when the fused kernel runs. What cannot win goes to cuDNN: fewer channels than one tensor-core
    tile (NiN's 10-channel head: the dots are mostly zero padding, and the launches cost more than
    the work), and fp32 without TF32 (the kernel's "ieee" dots are FMA loops, far below cuDNN's
    FP32 convolutions) or any dtype the GPU tables do not cover (fp64)."""
    if C < MIN_TENSOR_CORE_CHANNELS:
        return f"{C} channels, fewer than the {MIN_TENSOR_CORE_CHANNELS} of a tensor-core tile"
    if _dtype_class(dtype, allow_tf32) == "ieee":
        return ("fp32 with TF32 off (IEEE fp32 dots are FMA loops)" if dtype == torch.float32
                else f"{str(dtype).removeprefix('torch.')} has no tensor-core kernel")
    return None


@functools.cache  # a pure function of its arguments, called on every launch
def gpu_plan(C: int, dtype: torch.dtype, allow_tf32: bool) -> Plan:
    """The GPU plan for C channels: a pure function of (dtype class, BLOCK_C)."""
    cls = _dtype_class(dtype, allow_tf32)
    bc = max(GPU_BLOCK_C[0], block_channels(C))
    unaligned, aligned = _BWD[cls]
    bwd = {k: Tiles(unaligned[k], aligned[k]) for k in unaligned}
    return Plan(input_precision="tf32" if cls == "tf32" else "ieee", block_c=bc,
                fwd=_FWD[(cls, bc)], reduce=_REDUCE, dw_programs=_DW_PROGRAMS, **bwd)


def select_plan(x: torch.Tensor) -> Plan:
    """The plan for this input: the fixed interpreter plan, or the GPU table's entry."""
    if INTERPRETED:
        return _interpreter_plan(x.shape[1])
    if x.device.type != "cuda":
        raise ValueError(f"fused_pointwise_mlp: needs CUDA tensors (or TRITON_INTERPRET=1 set "
                         f"before importing triton, to run on CPU); got x on {x.device}")
    C = x.shape[1]
    # a symbolic C (torch.compile with a dynamic channel dimension) is unhashable: no cache then
    plan = gpu_plan if isinstance(C, int) else gpu_plan.__wrapped__
    return plan(C, x.dtype, conv_allows_tf32())


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled kernel: kernel, dtype, constexprs, launch options and the JIT's integer
    specializations (arguments equal to 1, arguments divisible by 16)."""

    kernel: str  # attribute name in kernels.pointwise_mlp, e.g. "_fwd_kernel"
    dtype: torch.dtype  # dtype of the tensors it reads (partial sums are fp32)
    constexprs: tuple[tuple[str, object], ...]  # every tl.constexpr argument, sorted by name
    num_warps: int
    num_stages: int
    layout: str  # "channels_last", "nchw", or "any" (layout-free kernels)
    aligned: bool  # the config for aligned channels_last launches
    unit_strides: tuple[str, ...]  # int arguments that are 1, which the JIT makes constants
    divisible: tuple[str, ...]  # int arguments divisible by 16


# (layout, aligned) pairs a launch can be: only channels_last launches are ever "aligned"
_LAUNCH_KINDS = (("channels_last", True), ("channels_last", False), ("nchw", False))


def gpu_variants() -> list[Variant]:
    """Every kernel variant the GPU dispatch can launch, for fp32 (ieee and tf32), bf16, fp16."""
    found: dict[Variant, None] = {}

    def add(kernel, dtype, tiles, **constexprs):
        for layout, aligned in _LAUNCH_KINDS:
            cfg = tiles.pick(aligned)
            meta = tuple(sorted(dict(cfg.meta, **constexprs).items()))
            divisible = ALWAYS_DIVISIBLE + (ALIGNED_ARGS[kernel] if aligned else ())
            found[Variant(kernel, dtype, meta, cfg.num_warps, cfg.num_stages, layout, aligned,
                          UNIT_STRIDES[kernel][layout], divisible)] = None

    for dtype, allow_tf32 in ((torch.float32, False), (torch.float32, True),
                              (torch.bfloat16, False), (torch.float16, False)):
        for bc in GPU_BLOCK_C:
            plan = gpu_plan(bc, dtype, allow_tf32)
            prec = plan.input_precision
            add("_fwd_kernel", dtype, plan.fwd, BLOCK_C=bc, INPUT_PRECISION=prec)
            add("_bwd_hidden_kernel", dtype, plan.hidden, INPUT_PRECISION=prec)
            add("_bwd_dx_kernel", dtype, plan.dx, INPUT_PRECISION=prec)
            add("_bwd_dw_kernel", dtype, plan.dw, INPUT_PRECISION=prec)
            rc = plan.reduce
            found[Variant("_bwd_reduce_kernel", dtype, rc.meta, rc.num_warps, rc.num_stages,
                          "any", False, (), ())] = None
    return list(found)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------


def _forward_impl(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, relu_input: bool = True) -> torch.Tensor:
    return launch_forward(x, w1, b1, w2, b2, relu_input, select_plan(x))


def _backward_impl(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                   w2: torch.Tensor, y: torch.Tensor, relu_input: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_backward(dy, x, w1, b1, w2, y, relu_input, select_plan(x))


def _forward_fake(x, w1, b1, w2, b2, relu_input=True):
    pointwise_mlp.check_inputs(x, w1, b1, w2, b2)
    return pointwise_mlp.empty_like_x(x)  # as launch_forward allocates


def _backward_fake(dy, x, w1, b1, w2, y, relu_input):
    C = x.shape[1]
    return (pointwise_mlp.empty_like_x(x),
            torch.empty((C, C, 1, 1), dtype=w1.dtype, device=w1.device),
            torch.empty((C,), dtype=b1.dtype, device=b1.device),
            torch.empty((C, C, 1, 1), dtype=w2.dtype, device=w2.device),
            torch.empty((C,), dtype=b1.dtype, device=b1.device))


if INTERPRETED:
    _forward_op = torch.library.custom_op(OP_NAME, _forward_impl, mutates_args=())
    _forward_op.register_fake(_forward_fake)
    _backward_op = torch.library.custom_op(BACKWARD_OP_NAME, _backward_impl, mutates_args=())
    _backward_op.register_fake(_backward_fake)
else:
    # triton_op traces the body itself for its fake implementation and for torch.compile
    _forward_op = torch.library.triton_op(OP_NAME, _forward_impl, mutates_args=())
    _backward_op = torch.library.triton_op(BACKWARD_OP_NAME, _backward_impl, mutates_args=())


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, _b2, relu_input = inputs
    # save the output for its ReLU mask; h is recomputed (see pointwise_mlp's docstring)
    ctx.save_for_backward(x, w1, b1, w2, output)
    ctx.relu_input = relu_input


def _backward(ctx, dy):
    x, w1, b1, w2, y = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = _backward_op(dy, x, w1, b1, w2, y, ctx.relu_input)
    return dx, dw1, db1, dw2, db2, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)

# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def fused_pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                        b2: torch.Tensor, relu_input: bool = True) -> torch.Tensor:
    """``relu(conv1x1(relu(conv1x1(relu(x), w1, b1)), w2, b2))`` in one fused Triton kernel.

    x: [N, C, H, W] in any memory format; w1, w2: [C, C, 1, 1] (as ``nn.Conv2d`` stores them);
    b1, b2: [C]; all one dtype (fp32, bf16, fp16; fp64 too), C <= 512. ``relu_input=False``
    skips the ReLU on x. Returns x's shape and memory format; differentiable in all five tensors.
    Under autocast the five tensors are cast to the autocast dtype first, as ``nn.Conv2d`` would be.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, w1, b1, w2, b2 = (t.to(dtype) for t in (x, w1, b1, w2, b2))
    return _forward_op(x, w1, b1, w2, b2, relu_input)


def reference_pointwise_mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                            w2: torch.Tensor, b2: torch.Tensor,
                            relu_input: bool = True) -> torch.Tensor:
    """The same maths in plain PyTorch (cuDNN convolutions on a GPU): the eager baseline."""
    a = F.relu(x) if relu_input else x
    return F.relu(F.conv2d(F.relu(F.conv2d(a, w1, b1)), w2, b2))
