"""Fused Triton 1x1-conv pairs vs cuDNN eager vs torch.compile, per NiN block (CUDA only).

Each NiN block ends in relu -> conv1x1 -> relu -> conv1x1 -> relu on C channels. At batch 128 and a
224-pixel input the four blocks give C=96 at 54x54, 256 at 26x26, 384 at 12x12 and 10 at 5x5. For
each, forward and forward+backward, bf16 and fp32, three implementations compute the same thing:

- triton:  kernels.fused_pointwise_mlp (one fused forward kernel, five backward launches);
- eager:   the nn.Module (nn.ReLU, nn.Conv2d(k=1), ...) on cuDNN, the input ReLU included;
- compile: torch.compile(mode="max-autotune") of that module.

Times are triton.testing.do_bench medians with 20/80% quantiles (L2 flushed between runs).
FLOPs: 2·M·C·C per 1x1 conv (M = N·H·W pixels), two convs, x3 for forward+backward. Minimum bytes:
read x, write y, read both weights and biases; forward+backward adds read dy, write dx and write
the weight and bias gradients. The roofline floor is max(FLOPs / peak FLOP/s, bytes / peak B/s)
with H100 SXM peaks by default (989 TFLOP/s dense bf16, 67 TFLOP/s fp32 without TF32 - the fp32
rows run with TF32 off unless --tf32, then 495 - and 3.35 TB/s HBM3); "% floor" is floor / time.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from nin_dist.bench.common import format_table, machine, write_json

BLOCKS = ((96, 54), (256, 26), (384, 12), (10, 5))  # (channels, spatial size) at a 224-pixel input
IMPLS = ("triton", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def add_arguments(p) -> None:
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--memory-format", choices=["channels_last", "nchw"], default="channels_last")
    p.add_argument("--compile-mode", default="max-autotune",
                   help="torch.compile mode for the 'compile' rows; 'none' skips them")
    p.add_argument("--tf32", action="store_true", help="let fp32 use TF32 (all three implementations)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench warm-up time")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench measuring time")
    p.add_argument("--peak-bf16", type=float, default=989.0, help="TFLOP/s, dense bf16")
    p.add_argument("--peak-fp32", type=float, default=67.0, help="TFLOP/s, fp32 without TF32")
    p.add_argument("--peak-tf32", type=float, default=495.0, help="TFLOP/s, dense TF32")
    p.add_argument("--peak-tbps", type=float, default=3.35, help="TB/s, memory bandwidth")
    p.add_argument("--png", metavar="PATH", help="write a bar chart of %% of the roofline floor here")


class BlockTail(nn.Module):
    """relu -> conv1x1 -> relu -> conv1x1 -> relu: the eager baseline, and what torch.compile gets."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(torch.relu(x)))))


def work(N: int, C: int, HW: int, itemsize: int, mode: str) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of one call, from the formulas in the module docstring."""
    M = N * HW
    flops = 2 * (2.0 * M * C * C)
    activations = 2 * M * C  # read x, write y
    weights = 2 * (C * C + C)  # both convs' weights and biases
    if mode == "fwd+bwd":
        flops *= 3  # the input gradient and the weight gradient each cost one forward
        activations += 2 * M * C  # read dy, write dx
        weights *= 2  # and write their gradients
    return flops, float((activations + weights) * itemsize)


def _step(fn, x: torch.Tensor, params: list[torch.Tensor], dy: torch.Tensor, mode: str):
    """A zero-argument callable running one forward (and backward) of fn."""
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                fn(x)
        return forward

    inputs = [x, *params]

    def forward_backward():
        torch.autograd.grad(fn(x), inputs, dy)  # grads returned, not accumulated into .grad
    return forward_backward


def _measure(N: int, C: int, size: int, dtype_name: str, args) -> list[dict]:
    import triton.testing

    from kernels import fused_pointwise_mlp

    dtype = DTYPES[dtype_name]
    fmt = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    module = BlockTail(C).to("cuda", dtype).to(memory_format=fmt)
    params = [module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias]
    x = torch.randn(N, C, size, size, device="cuda", dtype=dtype).to(memory_format=fmt).requires_grad_()
    dy = torch.randn_like(x)
    impls = {"triton": lambda t: fused_pointwise_mlp(t, *params, relu_input=True), "eager": module}
    if args.compile_mode != "none":
        impls["compile"] = torch.compile(module, mode=args.compile_mode)
    rows = []
    for mode in MODES:
        for impl, fn in impls.items():
            step = _step(fn, x, params, dy, mode)
            step()  # compile / autotune outside the timing
            median, p20, p80 = triton.testing.do_bench(step, warmup=args.warmup_ms, rep=args.rep_ms,
                                                       quantiles=[0.5, 0.2, 0.8])
            rows.append({"block": f"C={C} {size}x{size}", "C": C, "size": size, "mode": mode, "dtype": dtype_name,
                         "impl": impl, "ms": median, "ms_p20": p20, "ms_p80": p80})
    return rows


def summarize(rows: list[dict], N: int, args) -> list[dict]:
    """Add TFLOP/s, GB/s, % of the roofline floor and speedups (ours vs eager, vs compile)."""
    peaks = {"bf16": args.peak_bf16, "fp32": args.peak_tf32 if args.tf32 else args.peak_fp32}
    itemsize = {"bf16": 2, "fp32": 4}
    for r in rows:
        flops, nbytes = work(N, r["C"], r["size"] ** 2, itemsize[r["dtype"]], r["mode"])
        seconds = r["ms"] / 1e3
        floor = max(flops / (peaks[r["dtype"]] * 1e12), nbytes / (args.peak_tbps * 1e12))
        r.update(tflops=flops / seconds / 1e12, gbps=nbytes / seconds / 1e9, pct_floor=100.0 * floor / seconds)
    by_key = {(r["block"], r["mode"], r["dtype"], r["impl"]): r for r in rows}
    for r in rows:
        if r["impl"] != "triton":
            continue
        for base in ("eager", "compile"):
            other = by_key.get((r["block"], r["mode"], r["dtype"], base))
            if other is not None:
                r[f"speedup_vs_{base}"] = other["ms"] / r["ms"]
    return rows


def plot(rows: list[dict], path: str) -> None:
    """Grouped bars: % of the roofline floor per (block, mode), one panel per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(11, 3.5 * len(dtypes)), squeeze=False)
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        order = {r["block"]: BLOCKS.index((r["C"], r["size"])) for r in rows}
        groups = sorted({(r["block"], r["mode"]) for r in rows if r["dtype"] == dtype},
                        key=lambda g: (order[g[0]], MODES.index(g[1])))
        impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            values = [next((r["pct_floor"] for r in rows if (r["block"], r["mode"], r["dtype"], r["impl"])
                            == (*g, dtype, impl)), 0.0) for g in groups]
            ax.bar([i + k * width for i in range(len(groups))], values, width, label=impl)
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{b}\n{m}" for b, m in groups], fontsize=8)
        ax.set_ylabel("% of roofline floor")
        ax.set_title(f"NiN 1x1 pairs, {dtype}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


@contextlib.contextmanager
def _fp32_precision(precision: str):
    """cuDNN convs and matmuls in fp32 as "ieee" or "tf32" (the API of torch >= 2.9), restored after."""
    settings = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    saved = [s.fp32_precision for s in settings]
    try:
        for s in settings:
            s.fp32_precision = precision
        yield
    finally:
        for s, old in zip(settings, saved, strict=True):
            s.fp32_precision = old


def run(args) -> int:
    if not torch.cuda.is_available():
        print("nin-bench kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    fp32_precision = "tf32" if args.tf32 else "ieee"
    with _fp32_precision(fp32_precision):
        rows = [row for name in args.dtypes for C, size in BLOCKS
                for row in _measure(args.batch_size, C, size, name, args)]
    rows = summarize(rows, args.batch_size, args)
    print(f"NiN 1x1 pairs at batch {args.batch_size}, {args.memory_format}, fp32 as {fp32_precision}, "
          f"on {torch.cuda.get_device_name()}")
    print(format_table(rows, ["block", "mode", "dtype", "impl", "ms", "ms_p20", "ms_p80", "tflops", "gbps",
                              "pct_floor", "speedup_vs_eager", "speedup_vs_compile"]))
    write_json(args.json, {"benchmark": "kernels", "machine": machine(), "args": vars(args), "rows": rows})
    if args.png:
        plot(rows, args.png)
    return 0
