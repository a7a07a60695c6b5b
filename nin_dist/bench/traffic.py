"""A model of each kernel's HBM and L2 bytes and FLOPs per NiN block, and the times it predicts (no GPU).

    nin-bench traffic [--batch-size 128] [--json PATH]

For every NiN block (C=96 at 54x54, 256 at 26x26, 384 at 12x12, 10 at 5x5; bf16, channels_last),
forward and backward, three implementations:

- eager: PyTorch's 7 kernels per pair forward (relu, conv, bias add, relu, conv, bias add, relu) and
  9 backward (3 ReLU backwards, 2 bias-gradient sums, 2 dgrad and 2 wgrad convs);
- fused-old: kernels.pointwise_mlp with the backward's chunk-slowest grid it first had;
- fused: the same kernels with the chunk-fastest grid (the forward is the same in both).

Bytes come from what each program loads and stores, with the tiles of kernels.ops' GPU table (the
aligned config for C a multiple of 16, else the unaligned one): "L2" counts every load and store a
program issues, as if none hit L1 (an upper bound: a forward program's x tile, 24 KB at C=96, may
well stay in L1 across its chunks); "HBM" counts each tensor once, except where the grid order sweeps the whole tensor
once per channel chunk and the tensors swept exceed the L2, when each sweep reads them again. Rules
the model does not capture: hits between consecutive kernels (it understates eager at C=384 and 10,
whose activations fit in L2), sector granularity, launch latency (the kernel count is shown) and
cuDNN's own tiling (eager's issued FLOPs are taken as useful; its convs re-read operands as a
128x128-tiled GEMM would). FLOPs: useful 2·M·C·C per GEMM (M = pixels); "issued" counts the padded
tiles the MMAs actually run.

Predicted time per kernel: max(issued FLOPs / dense 16-bit peak, HBM bytes / HBM bandwidth, L2 bytes /
L2 bandwidth), summed over kernels. Peaks (NVIDIA datasheets): H100 SXM5 989 TFLOP/s dense BF16 and
3.35 TB/s HBM3; H200 SXM 989 TFLOP/s dense BF16 and 4.8 TB/s HBM3e; both 50 MB of L2 (the GH100
die). No datasheet gives L2 bandwidth: --l2-tbps (default 5.5 TB/s) is a microbenchmark-level figure.
The first GPU run measures the same rows (`nin-bench kernels`), which checks the model against the card.
"""

from __future__ import annotations

import dataclasses
import math

from nin_dist.bench.common import format_table, write_json

BLOCKS = ((96, 54), (256, 26), (384, 12), (10, 5))  # (channels, spatial size) at a 224-pixel input
BYTES = 2  # bf16
PARTIAL_BYTES = 4  # the dW kernel's fp32 partial sums


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # dense 16-bit tensor-core peak, TFLOP/s
    hbm_tbps: float  # HBM bandwidth, TB/s
    l2_mb: float  # L2 capacity, MB


DEVICES = (Device("H100", 989.0, 3.35, 50.0), Device("H200", 989.0, 4.8, 50.0))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch's work: FLOPs useful and issued (padded tiles), bytes to and from HBM and L2."""

    name: str
    flops: float
    issued_flops: float
    hbm_bytes: float
    l2_bytes: float

    def seconds(self, device: Device, l2_tbps: float) -> float:
        return max(self.issued_flops / (device.tflops * 1e12), self.hbm_bytes / (device.hbm_tbps * 1e12),
                   self.l2_bytes / (l2_tbps * 1e12))


def _up(n: int, block: int) -> int:
    """n rounded up to a multiple of block."""
    return -(-n // block) * block


def _c_pad(C: int) -> int:
    return _up(C, 16)


def eager_forward(M: int, C: int, b: int = BYTES) -> list[Kernel]:
    """relu, conv, bias, relu, conv, bias, relu: each reads one activation and writes one."""
    act = M * C * b
    weights = C * C * b
    conv_l2 = 2 * act * math.ceil(C / 128) + weights * math.ceil(M / 128)  # a 128x128-tiled GEMM's loads
    elementwise = Kernel("eager elementwise", 0.0, 0.0, 2 * act, 2 * act)
    conv = Kernel("eager conv", 2.0 * M * C * C, 2.0 * M * C * C, 2 * act + weights, conv_l2)
    names = ("relu", "conv", "bias", "relu", "conv", "bias", "relu")
    return [dataclasses.replace(conv if n == "conv" else elementwise, name=f"eager {n}") for n in names]


def eager_backward(M: int, C: int, b: int = BYTES) -> list[Kernel]:
    """Three ReLU backwards (read grad and output, write grad), two bias sums (read grad), and per
    conv a dgrad (read grad, write grad) and a wgrad (read grad and input)."""
    act = M * C * b
    weights = C * C * b
    gemm = 2.0 * M * C * C
    conv_l2 = 2 * act * math.ceil(C / 128) + weights * math.ceil(M / 128)
    relu = Kernel("eager relu_bwd", 0.0, 0.0, 3 * act, 3 * act)
    bias = Kernel("eager bias_grad", 0.0, 0.0, act, act)
    dgrad = Kernel("eager dgrad", gemm, gemm, 2 * act + weights, conv_l2)
    wgrad = Kernel("eager wgrad", gemm, gemm, 2 * act + weights, conv_l2)
    return [relu, bias, dgrad, wgrad, relu, bias, dgrad, wgrad, relu]


def fused_forward(M: int, C: int, tiles, block_c: int, b: int = BYTES) -> list[Kernel]:
    """_fwd_kernel: a program owns BLOCK_M pixels and all C outputs; per hidden chunk it loads its
    x tile again (all C inputs) and that chunk's rows of W1 and columns of W2."""
    bm, bh, bk = tiles["BLOCK_M"], tiles["BLOCK_H"], tiles["BLOCK_K"]
    programs, chunks = math.ceil(M / bm), math.ceil(C / bh)
    act = M * C * b
    l2 = chunks * act + programs * 2 * C * C * b + act  # x per chunk, both weights per program, y
    hbm = 2 * act + 2 * C * _c_pad(C) * b + 2 * C * b  # x, y, the padded weights and biases once
    issued = 2.0 * programs * bm * (chunks * bh) * (_up(C, bk) + block_c)  # GEMM1 K-padded, GEMM2 to BLOCK_C
    return [Kernel("fused fwd", 4.0 * M * C * C, issued, hbm, l2)]


def fused_backward(M: int, C: int, plan_tiles: dict, dw_programs: int, chunks_fastest: bool,
                   l2_bytes: float, b: int = BYTES) -> list[Kernel]:
    """The five backward launches. With the chunk slowest (``chunks_fastest=False``) the hidden kernel
    sweeps x, y and dy once per hidden chunk and dx sweeps dz1 once per input-channel tile; a sweep
    reads them from HBM again when they exceed the L2."""
    act, weights = M * C * b, C * _c_pad(C) * b
    gemm = 2.0 * M * C * C

    def sweeps(chunks: int, swept_bytes: float) -> int:
        return 1 if chunks_fastest or swept_bytes <= l2_bytes else chunks

    hd = plan_tiles["hidden"]
    bm, bh, bk = hd["BLOCK_M"], hd["BLOCK_H"], hd["BLOCK_K"]
    tiles, chunks = math.ceil(M / bm), math.ceil(C / bh)
    # per program: x tile (all C), y and dy tiles (all C) and again its chunk's columns; W1 rows and
    # W2 columns of its chunk; stores h, dz1, dz2 for its chunk
    hidden = Kernel("fused bwd_hidden", 2 * gemm, 2.0 * tiles * bm * chunks * bh * 2 * _up(C, bk),
                    3 * act * sweeps(chunks, 3 * act) + 2 * weights + 3 * act,
                    chunks * 3 * act + 2 * act + tiles * 2 * C * C * b + 3 * act)
    dx_t = plan_tiles["dx"]
    bm, bi, bk = dx_t["BLOCK_M"], dx_t["BLOCK_I"], dx_t["BLOCK_K"]
    tiles, chunks = math.ceil(M / bm), math.ceil(C / bi)
    dx = Kernel("fused bwd_dx", gemm, 2.0 * tiles * bm * chunks * bi * _up(C, bk),
                act * sweeps(chunks, M * _c_pad(C) * b) + act + weights + act,  # dz1 per sweep, x, W1, dx
                chunks * act + act + tiles * C * C * b + act)
    dw_t = plan_tiles["dw"]
    bo, bi, bm = dw_t["BLOCK_O"], dw_t["BLOCK_I"], dw_t["BLOCK_M"]
    tiles_o, tiles_i, tiles_m = math.ceil(C / bo), math.ceil(C / bi), math.ceil(M / bm)
    split = max(1, min(tiles_m, math.ceil(dw_programs / (tiles_o * tiles_i))))
    split = math.ceil(tiles_m / math.ceil(tiles_m / split))  # as the launcher: no empty splits
    partials = split * (C * C + C) * PARTIAL_BYTES
    # the programs of one split share its pixel range, so G and P come from HBM once
    dw = Kernel("fused bwd_dw", gemm, 2.0 * tiles_o * bo * tiles_i * bi * tiles_m * bm,
                2 * act + partials, tiles_i * act + tiles_o * act + partials)
    reduce = Kernel("fused bwd_reduce", 0.0, 0.0, partials + (C * C + C) * b, partials + (C * C + C) * b)
    return [hidden, dx, dw, reduce, dw, reduce]


def plan_tiles(C: int) -> tuple[dict, int, dict, int]:
    """(forward tiles, BLOCK_C, backward tiles by kernel, dW programs) of kernels.ops' bf16 GPU plan for
    channels_last at C (the aligned config when C is a multiple of 16, as the dispatch picks)."""
    import torch

    from kernels.ops import gpu_plan  # the tables themselves, so the model follows them

    plan = gpu_plan(C, torch.bfloat16, False)
    aligned = C % 16 == 0

    def tiles(t):
        return dict(t.pick(aligned).meta)

    return tiles(plan.fwd), plan.block_c, {k: tiles(getattr(plan, k)) for k in ("hidden", "dx", "dw")}, \
        plan.dw_programs


def block_rows(C: int, size: int, batch: int, l2_tbps: float) -> list[dict]:
    """One row per (direction, implementation) of a block: kernels, GFLOP, MB, predicted µs per device."""
    M = batch * size * size
    fwd_tiles, block_c, bwd_tiles, dw_programs = plan_tiles(C)
    l2_bytes = min(d.l2_mb for d in DEVICES) * 1e6
    fused_fwd = fused_forward(M, C, fwd_tiles, block_c)
    kernels = {
        ("fwd", "eager"): eager_forward(M, C),
        ("fwd", "fused-old"): fused_fwd,
        ("fwd", "fused"): fused_fwd,
        ("bwd", "eager"): eager_backward(M, C),
        ("bwd", "fused-old"): fused_backward(M, C, bwd_tiles, dw_programs, False, l2_bytes),
        ("bwd", "fused"): fused_backward(M, C, bwd_tiles, dw_programs, True, l2_bytes),
    }
    rows = []
    for (direction, impl), ks in kernels.items():
        row = {"block": f"C={C} {size}x{size}", "C": C, "direction": direction, "impl": impl, "kernels": len(ks),
               "gflop": sum(k.flops for k in ks) / 1e9, "gflop_issued": sum(k.issued_flops for k in ks) / 1e9,
               "hbm_mb": sum(k.hbm_bytes for k in ks) / 1e6, "l2_mb": sum(k.l2_bytes for k in ks) / 1e6}
        for d in DEVICES:
            row[f"{d.name}_us"] = sum(k.seconds(d, l2_tbps) for k in ks) * 1e6
        row["per_kernel"] = [dataclasses.asdict(k) for k in ks]
        rows.append(row)
    for direction in ("fwd", "bwd"):  # predicted speedup over eager on each device
        eager = next(r for r in rows if r["direction"] == direction and r["impl"] == "eager")
        for r in rows:
            if r["direction"] == direction:
                for d in DEVICES:
                    r[f"{d.name}_x_eager"] = eager[f"{d.name}_us"] / r[f"{d.name}_us"]
    return rows


def add_arguments(p) -> None:
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--l2-tbps", type=float, default=5.5, help="L2 bandwidth, TB/s (no datasheet gives it)")


def run(args) -> int:
    rows = []
    for C, size in BLOCKS:
        rows += block_rows(C, size, args.batch_size, args.l2_tbps)
    print(f"Modelled traffic per NiN 1x1 pair, bf16 channels_last, batch {args.batch_size}; predicted µs from "
          f"datasheet peaks ({', '.join(f'{d.name} {d.tflops:g} TFLOP/s {d.hbm_tbps:g} TB/s' for d in DEVICES)}, "
          f"L2 {args.l2_tbps:g} TB/s); x_eager = eager µs / this row's µs")
    columns = ["block", "direction", "impl", "kernels", "gflop", "gflop_issued", "hbm_mb", "l2_mb",
               "H100_us", "H200_us", "H100_x_eager", "H200_x_eager"]
    print(format_table(rows, columns))
    for C, _ in BLOCKS:  # forward + backward, the training step's share
        pair = {impl: sum(r["H100_us"] for r in rows if r["C"] == C and r["impl"] == impl)
                for impl in ("eager", "fused-old", "fused")}
        print(f"C={C}: fwd+bwd on H100 {pair['eager']:.1f} µs eager, {pair['fused-old']:.1f} fused-old "
              f"({pair['eager'] / pair['fused-old']:.2f}x), {pair['fused']:.1f} fused "
              f"({pair['eager'] / pair['fused']:.2f}x)")
    write_json(args.json, {"benchmark": "traffic", "args": vars(args),
                           "devices": [dataclasses.asdict(d) for d in DEVICES], "rows": rows})
    return 0
