"""Fused pair of 1x1 convolutions with ReLUs (one NiN block's tail), forward and backward.

Maths
-----
A 1x1 convolution is a matrix product over channels at every pixel, so read the block's input
``x`` ([N, C, H, W]) as a matrix with one row per pixel: M = N·H·W rows, K = C columns. With W1,
W2 the [C, C] weights (out, in) and b1, b2 the biases, the forward is::

    a = relu(x)              (only when relu_input; else a = x)
    h = relu(a·W1ᵀ + b1)     [M, C]  the hidden activation
    y = relu(h·W2ᵀ + b2)     [M, C]  the output

and, given dy = ∂L/∂y, the vector-Jacobian products are::

    dz2 = dy ⊙ [y > 0]       the ReLU mask comes from the saved output
    dW2 = dz2ᵀ·h             db2 = Σ_rows dz2
    dh  = dz2·W2
    dz1 = dh ⊙ [h > 0]
    dW1 = dz1ᵀ·a             db1 = Σ_rows dz1
    dx  = (dz1·W1) ⊙ [x > 0] (the mask only when relu_input)

Saved versus recomputed: autograd keeps ``x`` (for ``a`` and its mask) and ``y`` (the output: its
consumer usually holds it anyway, so keeping it costs nothing) and the backward *recomputes* ``h``.
Saving ``h`` would add an activation as large as the block's output to every block's memory, while
recomputing it is one GEMM out of six (two forward, four backward), a short one at NiN's C.

Tiling
------
Pixels are addressed per image: pixel p of image n, channel c sits at ``n·s_n + p·s_p + c·s_c``.
A launch shares one unit stride: s_c = 1 for all its tensors (channels_last) or s_p = 1 (NCHW);
the launcher copies an input that has neither (a crop, a transposed view) into the output's
layout. Triton turns an int argument equal to 1 into a constant, so each layout gets its own
kernel with coalesced loads along the unit stride. When every tensor has s_n = H·W·s_p
(channels_last, a batch of one, one-pixel images) the batch reads as one image of N·H·W
pixels, so tiles do not stop at image borders. Tile bases are int64 (N·C·H·W may pass 2**31),
offsets inside a tile int32 (the launcher checks they fit), and every load and store is masked:
neither the pixel count nor C need be a multiple of any block.

Weights are passed as [C, C_PAD] matrices and the backward's buffers as [M, C_PAD], C_PAD = C
rounded up to 16, so every row starts 16-element aligned whatever C is (in kernels.aot, this is what
took the spills of the configs for odd C to zero). Activations in channels_last whose C and
strides are multiples of 16 are "aligned" too; the dispatch gives those launches bigger tiles
(``Tiles.aligned``), since scalar loads spend a 64-bit address register per element and must use
smaller tiles to stay clear of spills.

Forward, ``_fwd_kernel``, grid (pixel tiles, images): a program owns BLOCK_M pixels and all C
output channels in an fp32 accumulator [BLOCK_M, BLOCK_C], BLOCK_C a power of two ≥ max(C, 16)
(``tl.dot`` needs power-of-two blocks of at least 16; padded channels are masked to zero).
Hidden channels are visited in chunks of BLOCK_H, so ``h`` is never whole on chip (C = 384 would
not fit): per chunk j, ``h_j = relu(a·W1[j]ᵀ + b1[j])`` is accumulated over input channels in
steps of BLOCK_K, rounded to the input dtype (as PyTorch's conv output would be) and at once
multiplied into the ``y`` accumulator by ``W2[:, j]ᵀ``. ``h`` never leaves the chip.

Backward, five launches, none holding a full-width tile:

1. ``_bwd_hidden_kernel``, one program per (pixel tile, hidden chunk): recomputes ``h_j``, forms
   ``dz2 = dy ⊙ [y > 0]`` in steps of output channels, accumulates ``dh_j = dz2·W2[:, j]``, masks
   it into ``dz1_j``, and writes ``h``, ``dz1`` and ``dz2`` as [M, C_PAD] row-major buffers in the
   input dtype (the rounding PyTorch's own backward gives these gradients).
2. ``_bwd_dx_kernel``, one program per (pixel tile, input-channel tile): ``dx = (dz1·W1) ⊙ [x > 0]``,
   a GEMM over hidden chunks, written in ``x``'s layout.
3. ``_bwd_dw_kernel``, once for (dz2, h) -> (dW2, db2) and once for (dz1, a) -> (dW1, db1), grid
   (weight tiles [BLOCK_O, BLOCK_I], SPLIT): split s owns a fixed contiguous range of pixel tiles
   and writes fp32 partial sums of Gᵀ·P, and of G's columns for the bias, to a [SPLIT, C·C + C]
   buffer.
4. ``_bwd_reduce_kernel`` adds the SPLIT partials in index order and casts to the weight dtype.

Launches 1 and 2 run a 1-D grid whose fastest index is the channel chunk: the programs that share
a pixel tile run side by side, so x, y and dy (dz1 for dx) come from HBM once per tile and from L2
for the other chunks. With the chunk slowest, every tile of chunk 0 ran before chunk 1 began, and
where they outgrow the L2 (x, y and dy are 215 and 133 MB at NiN's C = 96 and 256 blocks, batch 128,
bf16, against an H100's 50 MB) each chunk read them from HBM again (``nin-bench traffic`` models it).

No float atomics anywhere: every sum runs in an order fixed by the shapes and the plan alone, so
two backward passes give bitwise-identical dW and db. Products accumulate in fp32 (fp64 for fp64
inputs), ReLUs act on the fp32 accumulator, and results are cast on the store.

NaN goes where ``nn.ReLU`` sends it: every ReLU keeps a NaN input (``tl.maximum``'s default would
turn it into 0, hiding a diverged run), and every backward mask is ``[out <= 0]`` zeroed rather than
``[out > 0]`` kept, so a NaN output passes its gradient on, as PyTorch's ReLU backward does.

``relu_input`` reaches the kernels as a float, ``input_floor``: ``a = max(x, floor)`` is relu(x)
for 0.0 and x itself for -inf. Triton never specializes float arguments, so one compiled kernel
serves both settings (and ``kernels.aot`` checks exactly the kernels that run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.interpreter import InterpretedFunction

MAX_CHANNELS = 512  # the widest y accumulator the forward is tuned (and AOT-checked) for
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: the kernel's block-size constexprs plus warps and stages."""

    meta: tuple[tuple[str, int], ...]  # (constexpr name, value) pairs, e.g. (("BLOCK_M", 64),)
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def make(cls, num_warps: int = 4, num_stages: int = 2, **meta: int) -> KernelConfig:
        return cls(tuple(sorted(meta.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return self._meta_dict[name]

    def launch_kwargs(self) -> dict[str, int]:
        return self._launch_kwargs

    # built once per config (configs are shared, frozen plan entries), not on every launch
    @functools.cached_property
    def _meta_dict(self) -> dict[str, int]:
        return dict(self.meta)

    @functools.cached_property
    def _launch_kwargs(self) -> dict[str, int]:
        return {**self._meta_dict, "num_warps": self.num_warps, "num_stages": self.num_stages}


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A kernel's two configs: one for any tensors, one for aligned channels_last tensors."""

    unaligned: KernelConfig  # scalar loads: smaller tiles keep the addresses in registers
    aligned: KernelConfig  # C, s_n and s_p multiples of 16: vector loads, room for bigger tiles

    def pick(self, aligned: bool) -> KernelConfig:
        return self.aligned if aligned else self.unaligned


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything the launchers need besides the tensors; ``kernels.ops.select_plan`` picks it."""

    input_precision: str  # tl.dot precision for fp32 operands: "ieee" or "tf32"
    block_c: int  # forward accumulator width, a power of two ≥ max(C, 16)
    fwd: Tiles  # _fwd_kernel: BLOCK_M, BLOCK_H, BLOCK_K
    hidden: Tiles  # _bwd_hidden_kernel: BLOCK_M, BLOCK_H, BLOCK_K
    dx: Tiles  # _bwd_dx_kernel: BLOCK_M, BLOCK_I, BLOCK_K
    dw: Tiles  # _bwd_dw_kernel: BLOCK_O, BLOCK_I, BLOCK_M
    reduce: KernelConfig  # _bwd_reduce_kernel: BLOCK
    dw_programs: int  # aim for about this many dW programs: sets SPLIT, the number of pixel ranges


# How the JIT specializes each kernel's int arguments in the launches below (kernels.aot compiles
# the same): an argument equal to 1 becomes a constant (the layout's unit stride: channels for
# channels_last, pixels for NCHW, and the grid order's STEP_C), and one divisible by 16 is marked
# so (what an "aligned" launch guarantees: C and the strides that are multiples of C).
UNIT_STRIDES = {
    "_fwd_kernel": {"channels_last": ("stride_xc", "stride_yc"),
                    "nchw": ("stride_xp", "stride_yp")},
    "_bwd_hidden_kernel": {"channels_last": ("stride_xc", "stride_yc", "STEP_C"),
                           "nchw": ("stride_xp", "stride_yp", "STEP_C")},
    "_bwd_dx_kernel": {"channels_last": ("stride_xc", "stride_dxc", "STEP_C"),
                       "nchw": ("stride_xp", "stride_dxp", "STEP_C")},
    "_bwd_dw_kernel": {"channels_last": ("stride_pc",), "nchw": ("stride_pp",)},
}
ALIGNED_ARGS = {
    "_fwd_kernel": ("C", "stride_xn", "stride_xp", "stride_yn", "stride_yp"),
    "_bwd_hidden_kernel": ("C", "stride_xn", "stride_xp", "stride_yn", "stride_yp"),
    "_bwd_dx_kernel": ("C", "stride_xn", "stride_xp", "stride_dxn", "stride_dxp"),
    "_bwd_dw_kernel": ("C", "stride_pn", "stride_pp"),
}
ALWAYS_DIVISIBLE = ("C_PAD",)  # a multiple of 16 by construction, in every launch


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _relu(z):
    """max(z, 0) keeping NaN as torch.relu does; tl.maximum's default (PropagateNan.NONE) turns NaN into 0.
    One max.NaN instruction: a compare and select held the forward's C=256 tiles over the register limit
    (ptxas spills on triton 3.6)."""
    return tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(g, out, floor):
    """g through a ReLU whose output (or input) is `out`: zero only where out <= floor, so a NaN
    passes g on, as PyTorch's threshold_backward does (a `out > floor` test would drop it)."""
    return tl.where(out <= floor, 0.0, g)


@triton.jit
def _tile_and_chunk(TILES_PER_IMAGE, TILES, CHUNKS, STEP_T, STEP_C):
    """(image n, pixel tile within it, channel chunk) of this program in a 1-D grid of TILES·CHUNKS
    programs, where the tile index advances every STEP_T programs and the chunk index every STEP_C.
    STEP_C = 1 (the launchers' order) runs one tile's chunks side by side, so the tile's inputs are
    read from HBM once and then from L2; STEP_T = 1 would sweep every tile before the next chunk."""
    pid = tl.program_id(0)
    tile = ((pid // STEP_T) % TILES).to(tl.int64)
    n = tile // TILES_PER_IMAGE
    return n, tile - n * TILES_PER_IMAGE, (pid // STEP_C) % CHUNKS


@triton.jit
def _first_gemm(x_tile, stride_xc, stride_xp, offs_m, mask_p, w1_ptr, hid, mask_hid, C, C_PAD, input_floor,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """z1 for hidden channels `hid` of a pixel tile: max(x, input_floor)·W1[hid]ᵀ, accumulated in fp32
    (fp64 for fp64 inputs), no bias. The forward and the backward's recompute share it, so the
    backward sees exactly the forward's z1."""
    ACC: tl.constexpr = tl.float64 if x_tile.dtype.element_ty == tl.float64 else tl.float32
    offs_k = tl.arange(0, BLOCK_K)
    acc_h = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < C
        a = tl.load(x_tile + offs_m[:, None] * stride_xp + kk[None, :] * stride_xc,
                    mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        a = tl.maximum(a, input_floor, propagate_nan=tl.PropagateNan.ALL).to(a.dtype)
        w1t = tl.load(w1_ptr + hid[None, :] * C_PAD + kk[:, None],
                      mask=mask_k[:, None] & mask_hid[None, :], other=0.0)  # [BLOCK_K, BLOCK_H]
        acc_h = tl.dot(a, w1t, acc_h, input_precision=INPUT_PRECISION)
    return acc_h


@triton.jit
def _fwd_kernel(
    # pointers
    x_ptr,  # [N, C, H, W] block input, before its first ReLU
    w1_ptr,  # [C, C_PAD] first 1x1 conv weight, (out, in)
    b1_ptr,  # [C] first bias
    w2_ptr,  # [C, C_PAD] second 1x1 conv weight, (out, in)
    b2_ptr,  # [C] second bias
    y_ptr,  # [N, C, H, W] output
    # sizes
    HW,  # pixels per image (N·H·W when the batch is read as one image)
    C,  # channels (in = hidden = out)
    C_PAD,  # row stride of the [C, C_PAD] weights: C rounded up to 16, for aligned rows
    # scalars
    input_floor,  # a = max(x, input_floor): 0.0 gives relu(x), -inf gives x
    # strides, in elements: one step along that dimension moves this far
    stride_xn, stride_xc, stride_xp,  # x: image, channel, pixel within the image
    stride_yn, stride_yc, stride_yp,  # y: image, channel, pixel
    # meta-parameters
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32: "ieee" or "tf32"
    BLOCK_C: tl.constexpr,  # output accumulator width, power of two ≥ C
    BLOCK_M: tl.constexpr,  # pixels per program
    BLOCK_H: tl.constexpr,  # hidden channels per chunk
    BLOCK_K: tl.constexpr,  # input channels per step of the first GEMM
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32

    # --- program -> BLOCK_M pixels of image n: int64 for the tile's base (N·C·H·W may pass
    # 2**31), int32 within the tile (the launcher checks C·s_c + BLOCK_M·s_p fits), so the
    # per-element offset arithmetic stays 32-bit
    pid_p = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    p0 = pid_p * BLOCK_M
    x_tile = x_ptr + n * stride_xn + p0 * stride_xp
    y_tile = y_ptr + n * stride_yn + p0 * stride_yp
    offs_m = tl.arange(0, BLOCK_M)
    mask_p = offs_m < HW - p0
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_h = tl.arange(0, BLOCK_H)

    acc_y = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for j0 in range(0, C, BLOCK_H):
        hid = j0 + offs_h
        mask_hid = hid < C
        # --- first GEMM for this hidden chunk: z1_j = a·W1[j]ᵀ, fp32 accumulation
        acc_h = _first_gemm(x_tile, stride_xc, stride_xp, offs_m, mask_p, w1_ptr, hid, mask_hid, C, C_PAD,
                            input_floor, INPUT_PRECISION, BLOCK_M, BLOCK_H, BLOCK_K)
        # --- h_j = relu(z1_j + b1[j]) in fp32, rounded to the input dtype like a conv output
        b1 = tl.load(b1_ptr + hid, mask=mask_hid, other=0.0).to(ACC)
        h = _relu(acc_h + b1[None, :]).to(x_ptr.dtype.element_ty)
        # --- second GEMM, accumulated over hidden chunks: z2 += h_j·W2[:, j]ᵀ
        w2t = tl.load(w2_ptr + offs_c[None, :] * C_PAD + hid[:, None],
                      mask=mask_hid[:, None] & mask_c[None, :], other=0.0)  # [BLOCK_H, BLOCK_C]
        acc_y = tl.dot(h, w2t, acc_y, input_precision=INPUT_PRECISION)

    # --- epilogue: bias and ReLU in fp32, cast on the masked store
    b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    y = _relu(acc_y + b2[None, :])
    tl.store(y_tile + offs_m[:, None] * stride_yp + offs_c[None, :] * stride_yc,
             y.to(y_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


@triton.jit
def _bwd_hidden_kernel(
    # pointers
    x_ptr,  # [N, C, H, W] forward input
    w1_ptr,  # [C, C_PAD] first weight, (out, in)
    b1_ptr,  # [C] first bias
    w2_ptr,  # [C, C_PAD] second weight, (out, in)
    y_ptr,  # [N, C, H, W] forward output (its ReLU mask)
    dy_ptr,  # [N, C, H, W] gradient of the output, strided exactly like y
    h_ptr,  # [M, C_PAD] out: recomputed hidden activation, row-major
    dz1_ptr,  # [M, C_PAD] out: gradient before the first ReLU, row-major
    dz2_ptr,  # [M, C_PAD] out: gradient before the second ReLU, row-major
    # sizes
    HW,  # pixels per image (N·H·W when the batch is read as one image)
    C,  # channels
    C_PAD,  # row stride of the weights and the [M, C_PAD] buffers: C rounded up to 16
    TILES_PER_IMAGE,  # cdiv(HW, BLOCK_M)
    TILES,  # all pixel tiles: images · TILES_PER_IMAGE
    CHUNKS,  # channel chunks per tile: cdiv(C, BLOCK_H)
    STEP_T, STEP_C,  # grid order (see _tile_and_chunk): the launchers pass STEP_C = 1, chunks fastest
    # scalars
    input_floor,  # a = max(x, input_floor): 0.0 gives relu(x), -inf gives x
    # strides, in elements
    stride_xn, stride_xc, stride_xp,  # x: image, channel, pixel
    stride_yn, stride_yc, stride_yp,  # y and dy: image, channel, pixel
    # meta-parameters
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # pixels per program
    BLOCK_H: tl.constexpr,  # hidden channels per program
    BLOCK_K: tl.constexpr,  # channels per step of both reductions
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32

    # --- program -> (BLOCK_M pixels of image n, BLOCK_H hidden channels); int64 tile bases
    n, pid_p, pid_h = _tile_and_chunk(TILES_PER_IMAGE, TILES, CHUNKS, STEP_T, STEP_C)
    p0 = pid_p * BLOCK_M
    x_tile = x_ptr + n * stride_xn + p0 * stride_xp
    y_tile = y_ptr + n * stride_yn + p0 * stride_yp
    dy_tile = dy_ptr + n * stride_yn + p0 * stride_yp
    row0 = (n * HW + p0) * C_PAD  # the tile's first row in the [M, C_PAD] buffers
    offs_m = tl.arange(0, BLOCK_M)
    mask_p = offs_m < HW - p0
    hid = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_hid = hid < C
    offs_k = tl.arange(0, BLOCK_K)

    # --- recompute z1_j = a·W1[j]ᵀ, as the forward does
    acc_h = _first_gemm(x_tile, stride_xc, stride_xp, offs_m, mask_p, w1_ptr, hid, mask_hid, C, C_PAD,
                        input_floor, INPUT_PRECISION, BLOCK_M, BLOCK_H, BLOCK_K)
    b1 = tl.load(b1_ptr + hid, mask=mask_hid, other=0.0).to(ACC)
    h = _relu(acc_h + b1[None, :])

    # --- dh_j = dz2·W2[:, j], with dz2 = dy ⊙ [y > 0] formed a step of output channels at a time
    acc_dh = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    for o0 in range(0, C, BLOCK_K):
        oo = o0 + offs_k
        mask_o = oo < C
        yo = offs_m[:, None] * stride_yp + oo[None, :] * stride_yc
        mask_po = mask_p[:, None] & mask_o[None, :]
        dy = tl.load(dy_tile + yo, mask=mask_po, other=0.0)
        y = tl.load(y_tile + yo, mask=mask_po, other=0.0)
        dz2 = _relu_grad(dy, y, 0.0)
        w2 = tl.load(w2_ptr + oo[:, None] * C_PAD + hid[None, :],
                     mask=mask_o[:, None] & mask_hid[None, :], other=0.0)  # [BLOCK_K, BLOCK_H]
        acc_dh = tl.dot(dz2, w2, acc_dh, input_precision=INPUT_PRECISION)

    # --- dz1_j = dh_j ⊙ [h_j > 0]; write h, dz1 and this chunk's columns of dz2 for the dW pass
    dz1 = _relu_grad(acc_dh, h, 0.0)
    mask_ph = mask_p[:, None] & mask_hid[None, :]
    buf = row0 + offs_m[:, None] * C_PAD + hid[None, :]
    tl.store(h_ptr + buf, h.to(h_ptr.dtype.element_ty), mask=mask_ph)
    tl.store(dz1_ptr + buf, dz1.to(dz1_ptr.dtype.element_ty), mask=mask_ph)
    # output and hidden channels share one range, so hidden chunk j also owns dz2's columns j
    yh = offs_m[:, None] * stride_yp + hid[None, :] * stride_yc
    dy = tl.load(dy_tile + yh, mask=mask_ph, other=0.0)
    y = tl.load(y_tile + yh, mask=mask_ph, other=0.0)
    tl.store(dz2_ptr + buf, _relu_grad(dy, y, 0.0), mask=mask_ph)


@triton.jit
def _bwd_dx_kernel(
    # pointers
    dz1_ptr,  # [M, C_PAD] gradient before the first ReLU, row-major
    w1_ptr,  # [C, C_PAD] first weight, (out, in)
    x_ptr,  # [N, C, H, W] forward input (its ReLU mask)
    dx_ptr,  # [N, C, H, W] out: gradient of x
    # sizes
    HW,  # pixels per image (N·H·W when the batch is read as one image)
    C,  # channels
    C_PAD,  # row stride of the weights and the [M, C_PAD] buffer: C rounded up to 16
    TILES_PER_IMAGE,  # cdiv(HW, BLOCK_M)
    TILES,  # all pixel tiles: images · TILES_PER_IMAGE
    CHUNKS,  # channel chunks per tile: cdiv(C, BLOCK_I)
    STEP_T, STEP_C,  # grid order (see _tile_and_chunk): the launchers pass STEP_C = 1, chunks fastest
    # scalars
    input_floor,  # the forward's a = max(x, input_floor): gradient flows where x > input_floor
    # strides, in elements
    stride_xn, stride_xc, stride_xp,  # x: image, channel, pixel
    stride_dxn, stride_dxc, stride_dxp,  # dx: image, channel, pixel
    # meta-parameters
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32: "ieee" or "tf32"
    BLOCK_M: tl.constexpr,  # pixels per program
    BLOCK_I: tl.constexpr,  # input channels per program
    BLOCK_K: tl.constexpr,  # hidden channels per reduction step
):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32

    # --- program -> (BLOCK_M pixels of image n, BLOCK_I input channels); int64 tile bases
    n, pid_p, pid_i = _tile_and_chunk(TILES_PER_IMAGE, TILES, CHUNKS, STEP_T, STEP_C)
    p0 = pid_p * BLOCK_M
    dz1_tile = dz1_ptr + (n * HW + p0) * C_PAD
    offs_m = tl.arange(0, BLOCK_M)
    mask_p = offs_m < HW - p0
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    offs_k = tl.arange(0, BLOCK_K)

    # --- dx = dz1·W1, fp32 accumulation over hidden chunks
    acc = tl.zeros([BLOCK_M, BLOCK_I], dtype=ACC)
    for j0 in range(0, C, BLOCK_K):
        hid = j0 + offs_k
        mask_hid = hid < C
        dz1 = tl.load(dz1_tile + offs_m[:, None] * C_PAD + hid[None, :],
                      mask=mask_p[:, None] & mask_hid[None, :], other=0.0)
        w1 = tl.load(w1_ptr + hid[:, None] * C_PAD + offs_i[None, :],
                     mask=mask_hid[:, None] & mask_i[None, :], other=0.0)  # [BLOCK_K, BLOCK_I]
        acc = tl.dot(dz1, w1, acc, input_precision=INPUT_PRECISION)

    # --- the input ReLU's mask [x > floor] (all-pass for -inf), then the store in dx's layout
    mask_pi = mask_p[:, None] & mask_i[None, :]
    x_tile = x_ptr + n * stride_xn + p0 * stride_xp
    x = tl.load(x_tile + offs_m[:, None] * stride_xp + offs_i[None, :] * stride_xc,
                mask=mask_pi, other=0.0)
    acc = _relu_grad(acc, x, input_floor)
    dx_tile = dx_ptr + n * stride_dxn + p0 * stride_dxp
    tl.store(dx_tile + offs_m[:, None] * stride_dxp + offs_i[None, :] * stride_dxc,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_pi)


@triton.jit
def _bwd_dw_kernel(
    # pointers
    g_ptr,  # [M, C_PAD] row-major gradient G (dz2 or dz1): rows of dW, and the bias gradient
    p_ptr,  # [N, C, H, W]-addressed activation P (the h buffer, or x for a): columns of dW
    part_ptr,  # [SPLIT, C·C + C] fp32 out: this split's Gᵀ·P, then its column sums of G
    # sizes
    HW,  # pixels per image (N·H·W when the batch is read as one image)
    C,  # channels
    C_PAD,  # row stride of the [M, C_PAD] buffer G: C rounded up to 16
    TILES_PER_IMAGE,  # cdiv(HW, BLOCK_M)
    TILES_PER_SPLIT,  # pixel tiles each split adds up (the last split may have fewer)
    TILES,  # all pixel tiles: images · TILES_PER_IMAGE
    # scalars
    p_floor,  # P = max(p, p_floor): 0.0 turns x into relu(x); -inf keeps P as it is
    # strides, in elements
    stride_pn, stride_pc, stride_pp,  # P: image, channel, pixel
    # meta-parameters
    INPUT_PRECISION: tl.constexpr,  # tl.dot precision for fp32: "ieee" or "tf32"
    BLOCK_O: tl.constexpr,  # rows of dW (the conv's output channels) per program
    BLOCK_I: tl.constexpr,  # columns of dW (the conv's input channels) per program
    BLOCK_M: tl.constexpr,  # pixels per reduction step
):
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32

    # --- program -> (tile of dW, split of the pixel tiles)
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    tiles_i = tl.cdiv(C, BLOCK_I)
    pid_o = pid_t // tiles_i
    pid_i = pid_t - pid_o * tiles_i
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < C
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < C
    offs_m = tl.arange(0, BLOCK_M)

    # --- Gᵀ·P over this split's tiles in a fixed order; G's column sums ride along for db
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    acc_b = tl.zeros([BLOCK_O], dtype=ACC)
    t_start = pid_s * TILES_PER_SPLIT
    t_end = tl.minimum(t_start + TILES_PER_SPLIT, TILES)
    for t in range(t_start, t_end):
        n = t // TILES_PER_IMAGE
        p0 = (t - n * TILES_PER_IMAGE) * BLOCK_M
        mask_p = offs_m < HW - p0
        g_tile = g_ptr + (n * HW + p0) * C_PAD
        gt = tl.load(g_tile + offs_o[:, None] + offs_m[None, :] * C_PAD,
                     mask=mask_o[:, None] & mask_p[None, :], other=0.0)  # [BLOCK_O, BLOCK_M]
        p_tile = p_ptr + n * stride_pn + p0 * stride_pp
        p = tl.load(p_tile + offs_m[:, None] * stride_pp + offs_i[None, :] * stride_pc,
                    mask=mask_p[:, None] & mask_i[None, :], other=0.0)  # [BLOCK_M, BLOCK_I]
        p = tl.maximum(p, p_floor, propagate_nan=tl.PropagateNan.ALL).to(p.dtype)
        acc = tl.dot(gt, p, acc, input_precision=INPUT_PRECISION)
        acc_b += tl.sum(gt.to(ACC), axis=1)

    # --- write this split's partial sums; the first column of tiles also owns the bias
    row = part_ptr + pid_s * (C * C + C)
    tl.store(row + offs_o[:, None] * C + offs_i[None, :], acc.to(part_ptr.dtype.element_ty),
             mask=mask_o[:, None] & mask_i[None, :])
    tl.store(row + C * C + offs_o, acc_b.to(part_ptr.dtype.element_ty), mask=mask_o & (pid_i == 0))


@triton.jit
def _bwd_reduce_kernel(
    # pointers
    part_ptr,  # [SPLIT, C·C + C] fp32 partial sums from _bwd_dw_kernel
    dw_ptr,  # [C, C] out: weight gradient, row-major
    db_ptr,  # [C] out: bias gradient
    # sizes
    C,  # channels
    SPLIT,  # rows of part to add
    # meta-parameters
    BLOCK: tl.constexpr,  # entries of the C·C + C row per program
):
    # --- program -> a slice of the flattened (dW, db) row
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    L = C * C + C
    mask = offs < L

    # --- add the splits in index order: the same order on every call, hence deterministic
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * L + offs, mask=mask, other=0.0)

    # --- the first C·C entries are dW, the last C are db
    is_w = offs < C * C
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=mask & is_w)
    tl.store(db_ptr + tl.where(is_w, 0, offs - C * C), acc.to(db_ptr.dtype.element_ty),
             mask=mask & (offs >= C * C))


# ---------------------------------------------------------------------------------------------
# Launchers: check the inputs, allocate the outputs, launch
# ---------------------------------------------------------------------------------------------


def check_inputs(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                 b2: torch.Tensor | None) -> None:
    """Raise ValueError unless x is [N, C, H, W], w1/w2 [C, C, 1, 1], b1/b2 [C], all alike.

    ``b2`` may be None: the backward does not need it.
    """
    tensors = (x, w1, b1, w2) if b2 is None else (x, w1, b1, w2, b2)

    def described() -> str:  # built only for an error message: a call that passes never pays for it
        named = zip(("x", "w1", "b1", "w2", "b2"), tensors, strict=False)  # b2 may be absent
        return ", ".join(f"{k}: {tuple(t.shape)} {t.dtype} on {t.device}" for k, t in named)

    if x.dim() != 4:
        raise ValueError(f"fused_pointwise_mlp: x must be [N, C, H, W]; got {described()}")
    C = x.shape[1]
    if w1.shape != (C, C, 1, 1) or w2.shape != (C, C, 1, 1):
        raise ValueError(f"fused_pointwise_mlp: w1 and w2 must be [C, C, 1, 1] with C={C} "
                         f"(1x1 conv weights); got {described()}")
    if b1.shape != (C,) or (b2 is not None and b2.shape != (C,)):
        raise ValueError(f"fused_pointwise_mlp: b1 and b2 must be [C] with C={C}; got {described()}")
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"fused_pointwise_mlp: C must be in [1, {MAX_CHANNELS}]; got {described()}")
    dtype, device = x.dtype, x.device
    if dtype not in SUPPORTED_DTYPES or any(t.dtype != dtype for t in tensors):
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"fused_pointwise_mlp: all tensors need one dtype out of {names}; "
                         f"got {described()}")
    if any(t.device != device for t in tensors):
        raise ValueError(f"fused_pointwise_mlp: all tensors must be on one device; got {described()}")


def output_format(x: torch.Tensor) -> torch.memory_format:
    """x's memory format: channels_last when channels are innermost, else contiguous (NCHW)."""
    channels_innermost = x.shape[1] > 1 and x.stride(1) == 1
    if channels_innermost and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_like_x(x: torch.Tensor) -> torch.Tensor:
    """A dense tensor of x's shape, dtype and memory format (the output, and dx)."""
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_format(x))


def _pixel_strides(t: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(t, (s_n, s_c, s_p)) with pixel p = h·W + w at p·s_p; t is copied if (h, w) do not flatten."""
    _, _, H, W = t.shape
    s_n, s_c, s_h, s_w = t.stride()
    if H * W == 1:
        s_p = s_n  # any value works for a one-pixel image; this one lets the batch flatten
    elif W == 1:
        s_p = s_h
    elif H == 1 or s_h == W * s_w:
        s_p = s_w
    else:  # e.g. a crop of a larger image: copy to NCHW
        return _pixel_strides(t.contiguous())
    return t, (s_n, s_c, s_p)


@dataclasses.dataclass
class _Arrangement:
    """The tensors of one op read as ``images`` images of ``HW`` pixels in one shared layout."""

    inputs: list  # the inputs, some copied into the output's layout
    images: int  # N, or 1 when the batch reads as one image of N·H·W pixels
    HW: int  # pixels per image
    strides: list  # (s_n, s_c, s_p) of the output, then of each input
    channels_last: bool  # s_c == 1 for all (else s_p == 1 for all)
    aligned: bool  # channels_last, and C, s_n, s_p and storage offsets are multiples of 16


def _arrange(out: torch.Tensor, *inputs: torch.Tensor) -> _Arrangement:
    """Read ``out`` and ``inputs`` in ``out``'s layout: the unit stride (channels for
    channels_last, pixels for NCHW) must be shared, so an input that differs is copied."""
    N, C, H, W = out.shape
    _, out_strides = _pixel_strides(out)  # out is dense: never copied
    channels_last = out_strides[1] == 1
    unit = 1 if channels_last else 2
    tensors, strides = [], [out_strides]
    for t in inputs:
        t, t_strides = _pixel_strides(t)
        if t_strides[unit] != 1:
            t, t_strides = torch.empty_like(out).copy_(t), out_strides
        tensors.append(t)
        strides.append(t_strides)
    images, HW = N, H * W
    if N > 1 and all(s_n == HW * s_p for s_n, _, s_p in strides):
        images, HW = 1, N * HW
        strides = [(0, s_c, s_p) for _, s_c, s_p in strides]
    if images > 65535:  # the grid's second dimension
        raise ValueError(f"fused_pointwise_mlp: at most 65535 images unless the batch is contiguous "
                         f"(channels_last); got {N} with strides {strides}")
    # in-tile offsets are int32 (tile bases are int64): at most C·s_c + BLOCK_M·s_p
    if any(C * abs(s_c) + 1024 * abs(s_p) >= 2**31 for _, s_c, s_p in strides):
        raise ValueError(f"fused_pointwise_mlp: images of {H}x{W} pixels with {C} channels are "
                         f"too large for int32 offsets within a tile; strides {strides}")
    aligned = (channels_last and C % 16 == 0
               and all(s_n % 16 == 0 and s_p % 16 == 0 for s_n, _, s_p in strides)
               and all(t.storage_offset() % 16 == 0 for t in (out, *tensors)))
    return _Arrangement(tensors, images, HW, strides, channels_last, aligned)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the launchers below make it, recorded instead of run (``recorded``)."""

    kernel: str  # attribute name in this module, e.g. "_fwd_kernel"
    grid: tuple[int, ...]
    args: tuple  # positional arguments: tensors, ints, floats, in the kernel's order
    kwargs: dict  # constexprs, num_warps, num_stages


_RECORDING: list[Launch] | None = None  # set by ``recorded``: launches are listed, not run


@dataclasses.dataclass
class _Recorder:
    """Stands in for ``kernel[grid](...)`` while recording."""

    kernel: str
    log: list[Launch]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(Launch(self.kernel, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recorded():
    """Within it, ``forward`` and ``backward`` append each launch they would make to the yielded
    list and run none, so meta tensors do: kernels.aot compiles the exact launches of given shapes
    (the integer arguments the JIT specializes on) without a GPU."""
    global _RECORDING
    previous, _RECORDING = _RECORDING, []
    try:
        yield _RECORDING
    finally:
        _RECORDING = previous


def _launchable(kernel):
    """``wrap_triton(kernel)``, so that ``triton_op`` traces the launch. Under TRITON_INTERPRET=1
    the kernel is a plain Python function that no graph ever holds (``kernels.ops`` registers the
    op as an opaque ``custom_op`` then), launched as it is: torch 2.11's wrap_triton refuses it."""
    if _RECORDING is not None:
        return _Recorder(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, _RECORDING)
    return kernel if isinstance(kernel, InterpretedFunction) else wrap_triton(kernel)


def _floor(relu_input: bool) -> float:
    return 0.0 if relu_input else float("-inf")


def _padded(C: int) -> int:
    return (C + 15) // 16 * 16


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function: a few µs per call from Python


# the forward's padded copies of weights whose C is not a multiple of 16, by id(weight): (weakref
# to the weight, its version counter and data pointer when copied, the copy); see _as_matrix
_PADDED: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}


def _as_matrix(w: torch.Tensor, for_backward: bool = False) -> torch.Tensor:
    """The [C, C, 1, 1] weight as a [C, C_PAD] matrix: rows 16-element aligned for vector loads.

    Where C needs padding, the forward always copies and keeps its copy, and the backward reuses it
    if the weight is unchanged since: the same tensor object (a weight cast afresh under autocast is a
    new one each call), the same storage (``.data =`` swaps it) and the same version counter (every
    in-place update, an optimizer step's included, bumps it). Only the backward reuses, because
    writes through ``w.data`` (gradcheck's perturbations, older training code) bump no counter: a
    forward that reused would compute with stale weights, while between a forward and its backward
    such a write already breaks autograd's saved tensors. Tensors that are not plain (fake and
    functional tensors under torch.compile) are never kept."""
    C = w.shape[0]
    C_pad = _padded(C)
    if C_pad == C:
        return w.reshape(C, C).contiguous()  # a view for nn.Conv2d's contiguous weights
    plain = type(w) is torch.Tensor and not torch.compiler.is_compiling()
    key = id(w)
    if plain and for_backward:
        entry = _PADDED.get(key)
        if entry is not None and entry[0]() is w and entry[1] == w._version and entry[2] == w.data_ptr():
            return entry[3]
    matrix = torch.nn.functional.pad(w.detach().reshape(C, C), (0, C_pad - C))  # zeros on the right
    if plain and not for_backward:
        _PADDED[key] = (weakref.ref(w, lambda _, key=key: _PADDED.pop(key, None)), w._version, w.data_ptr(),
                        matrix)
    return matrix


def forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, relu_input: bool, plan: Plan) -> torch.Tensor:
    """y = relu(W2·relu(W1·relu(x) + b1) + b2) per pixel, in x's memory format."""
    check_inputs(x, w1, b1, w2, b2)
    N, C, H, W = x.shape
    y = empty_like_x(x)
    if N * H * W == 0:
        return y
    lay = _arrange(y, x)
    (x,), (y_strides, x_strides) = lay.inputs, lay.strides
    cfg = plan.fwd.pick(lay.aligned)
    grid = (_cdiv(lay.HW, cfg["BLOCK_M"]), lay.images)
    _launchable(_fwd_kernel)[grid](
        x, _as_matrix(w1), b1.contiguous(), _as_matrix(w2), b2.contiguous(), y,
        lay.HW, C, _padded(C), _floor(relu_input), *x_strides, *y_strides,
        INPUT_PRECISION=plan.input_precision, BLOCK_C=plan.block_c, **cfg.launch_kwargs(),
    )
    return y


def _chunked_grid(images: int, HW: int, C: int, block_m: int, block_c: int,
                  chunks_fastest: bool) -> tuple[tuple[int], tuple[int, ...]]:
    """The 1-D grid of a (pixel tile, channel chunk) kernel and its order arguments
    (TILES_PER_IMAGE, TILES, CHUNKS, STEP_T, STEP_C); see _tile_and_chunk."""
    tiles_per_image = _cdiv(HW, block_m)
    tiles, chunks = images * tiles_per_image, _cdiv(C, block_c)
    steps = (chunks, 1) if chunks_fastest else (1, tiles)
    return (tiles * chunks,), (tiles_per_image, tiles, chunks, *steps)


def backward(dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
             w2: torch.Tensor, y: torch.Tensor, relu_input: bool,
             plan: Plan, chunks_fastest: bool = True) -> tuple[torch.Tensor, ...]:
    """(dx, dW1, db1, dW2, db2) from the saved x and y, recomputing h; dx in x's memory format.

    ``chunks_fastest=False`` launches the two chunked kernels in the order they first had (every
    pixel tile of a chunk before the next chunk): slower on a GPU, and the test's proof that the
    order changes no bit of the result."""
    check_inputs(x, w1, b1, w2, None)
    if dy.shape != x.shape or y.shape != x.shape or dy.dtype != x.dtype or y.dtype != x.dtype:
        raise ValueError(f"fused_pointwise_mlp backward: dy and y must match x "
                         f"{tuple(x.shape)} {x.dtype}; got dy {tuple(dy.shape)} {dy.dtype}, "
                         f"y {tuple(y.shape)} {y.dtype}")
    N, C, H, W = x.shape
    M = N * H * W
    dx = empty_like_x(x)
    # the [C, C, 1, 1] weight gradients come out contiguous, whatever the weights' strides
    dw1 = torch.empty((C, C, 1, 1), dtype=x.dtype, device=x.device)
    dw2 = torch.empty((C, C, 1, 1), dtype=x.dtype, device=x.device)
    db1 = torch.empty((C,), dtype=x.dtype, device=x.device)
    db2 = torch.empty((C,), dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    # one stride set serves y and dy in the hidden kernel: give dy y's exact strides
    if _pixel_strides(dy)[1] != _pixel_strides(y)[1]:
        dy = torch.empty_like(y).copy_(dy)
    lay = _arrange(dx, x, y, dy)
    (x, y, dy), (dx_strides, x_strides, y_strides, _) = lay.inputs, lay.strides
    w1m, w2m, b1 = _as_matrix(w1, for_backward=True), _as_matrix(w2, for_backward=True), b1.contiguous()
    images, HW, prec, floor = lay.images, lay.HW, plan.input_precision, _floor(relu_input)

    # --- 1. recompute h; dz2 and dz1 (row-major [M, C_PAD] buffers in the input dtype)
    C_pad = _padded(C)
    h = torch.empty((M, C_pad), dtype=x.dtype, device=x.device)
    dz1 = torch.empty_like(h)
    dz2 = torch.empty_like(h)
    cfg = plan.hidden.pick(lay.aligned)
    grid, order = _chunked_grid(images, HW, C, cfg["BLOCK_M"], cfg["BLOCK_H"], chunks_fastest)
    _launchable(_bwd_hidden_kernel)[grid](
        x, w1m, b1, w2m, y, dy, h, dz1, dz2,
        HW, C, C_pad, *order, floor, *x_strides, *y_strides,
        INPUT_PRECISION=prec, **cfg.launch_kwargs(),
    )

    # --- 2. dx = (dz1·W1) ⊙ [x > 0]
    cfg = plan.dx.pick(lay.aligned)
    grid, order = _chunked_grid(images, HW, C, cfg["BLOCK_M"], cfg["BLOCK_I"], chunks_fastest)
    _launchable(_bwd_dx_kernel)[grid](
        dz1, w1m, x, dx,
        HW, C, C_pad, *order, floor, *x_strides, *dx_strides,
        INPUT_PRECISION=prec, **cfg.launch_kwargs(),
    )

    # --- 3. per-split partial sums of dW2 = dz2ᵀ·h and dW1 = dz1ᵀ·a, then a fixed-order reduce
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h_strides = (HW * C_pad, 1, C_pad)  # the [M, C_PAD] buffer read as images of HW pixels
    for g, p, p_strides, p_floor, aligned, dw, db in (
        (dz2, h, h_strides, float("-inf"), C % 16 == 0, dw2, db2),  # h: channels_last, rows aligned
        (dz1, x, x_strides, floor, lay.aligned, dw1, db1),
    ):
        cfg = plan.dw.pick(aligned)
        tiles_per_image = _cdiv(HW, cfg["BLOCK_M"])
        tiles = images * tiles_per_image
        tiles_w = _cdiv(C, cfg["BLOCK_O"]) * _cdiv(C, cfg["BLOCK_I"])
        split = max(1, min(tiles, _cdiv(plan.dw_programs, tiles_w)))
        tiles_per_split = _cdiv(tiles, split)
        split = _cdiv(tiles, tiles_per_split)  # no empty splits
        part = torch.empty((split, C * C + C), dtype=acc_dtype, device=x.device)
        _launchable(_bwd_dw_kernel)[(tiles_w, split)](
            g, p, part,
            HW, C, C_pad, tiles_per_image, tiles_per_split, tiles, p_floor, *p_strides,
            INPUT_PRECISION=prec, **cfg.launch_kwargs(),
        )
        rcfg = plan.reduce
        _launchable(_bwd_reduce_kernel)[(_cdiv(C * C + C, rcfg["BLOCK"]),)](
            part, dw, db, C, split, **rcfg.launch_kwargs(),
        )
    return dx, dw1, db1, dw2, db2
