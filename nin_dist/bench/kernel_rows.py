"""The GPU visit's kernel step: the fused pair against cuDNN per NiN block, one JSON line per result.

    python -m nin_dist.bench.kernel_rows --jsonl DIR/kernels.jsonl --trace-dir DIR/traces   # a GPU
    TRITON_INTERPRET=1 python -m nin_dist.bench.kernel_rows --jsonl F --tiny                # the dry run

Rows, most valuable first, each appended as soon as it is measured (`nin_dist.bench.rows`):

- "device": the card and its datasheet peaks (`nin_dist.bench.peaks`; none for an unknown card);
- "overhead": `kernels.overhead`'s Python µs of one call up to its launches, per block;
- "predicted": `nin-bench traffic`'s modelled bytes and µs on this card, batch 128 and 256;
- then per (batch, layout, dtype), in the order bf16 channels_last at 128, fp32 as TF32, NCHW, 256:
  - "error": at full size, y and the five gradients (dx, dW1, db1, dW2, db2) of the fused kernel
    against cuDNN (the eager module), as relative norms ||a - b|| / ||b||, and of each against a
    float64 reference (which one a ReLU-mask flip moved shows);
  - "time": per implementation and mode (fwd, fwd+bwd), do_bench's median with 20/80% quantiles
    (L2 flushed), the same step replayed from a CUDA graph (kernel time without Python and launch
    cost; launch_ms is the difference), TFLOP/s and % of the roofline floor from the card's peaks,
    and the traffic model's prediction for the row;
  - "trace": after the first configuration's blocks, one torch.profiler trace per block
    (fused and eager, fwd+bwd) in --trace-dir.
- "speedup": the fused kernel's ratios to eager per block, mode and configuration, at the end.

fp32 runs as TF32 in all implementations (cuDNN's setting decides the kernel's precision too).
`--tiny` is the dry run's: CPU tensors under Triton's interpreter, fp32, two small blocks, times by
the wall clock and no CUDA graphs, so the same code writes the same rows without a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from nin_dist.bench import peaks as peaks_table
from nin_dist.bench import traffic
from nin_dist.bench.kernels import BLOCKS, BlockTail, _fp32_precision, _step, work
from nin_dist.bench.rows import RowWriter

TINY_BLOCKS = ((16, 4), (10, 3))
GRADS = ("dx", "dw1", "db1", "dw2", "db2")
FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def configurations(batch_sizes: list[int], tiny: bool) -> list[tuple[int, str, str]]:
    """(batch, layout, dtype) in order of value: the training step's case first, 256 last."""
    if tiny:
        return [(2, "channels_last", "fp32"), (2, "nchw", "fp32")]
    first, *rest = batch_sizes
    found = [(first, "channels_last", "bf16"), (first, "channels_last", "fp32"), (first, "nchw", "bf16")]
    return found + [(b, "channels_last", d) for b in rest for d in ("bf16", "fp32")]


def _setup(N: int, C: int, size: int, dtype, layout: str, device: str):
    torch.manual_seed(C)
    fmt = FORMATS[layout]
    module = BlockTail(C).to(device, dtype).to(memory_format=fmt)
    params = [module.conv1.weight, module.conv1.bias, module.conv2.weight, module.conv2.bias]
    x = torch.randn(N, C, size, size, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_()
    return module, params, x, torch.randn_like(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def error_row(N, C, size, dtype, layout, device) -> dict:
    """Relative-norm errors of y and the five gradients: fused vs cuDNN, and each vs float64."""
    from kernels import fused_pointwise_mlp

    module, params, x, dy = _setup(N, C, size, dtype, layout, device)
    inputs = [x, *params]
    fused = lambda t: fused_pointwise_mlp(t, *params, relu_input=True)  # noqa: E731
    outs = {}
    for name, fn in (("fused", fused), ("cudnn", module)):
        y = fn(x)
        outs[name] = [y.detach(), *torch.autograd.grad(y, inputs, dy)]
    ref = BlockTail(C).to(device, torch.float64)
    ref.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    y64 = ref(x64)
    ref_params = [ref.conv1.weight, ref.conv1.bias, ref.conv2.weight, ref.conv2.bias]
    outs["fp64"] = [y64.detach(), *torch.autograd.grad(y64, [x64, *ref_params], dy.double())]
    row = {}
    for i, name in enumerate(("y", *GRADS)):
        row[f"{name}_vs_cudnn"] = _rel(outs["fused"][i], outs["cudnn"][i])
        row[f"{name}_fused_vs_fp64"] = _rel(outs["fused"][i], outs["fp64"][i])
        row[f"{name}_cudnn_vs_fp64"] = _rel(outs["cudnn"][i], outs["fp64"][i])
    return row


def _wall_ms(fn, calls: int = 3) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timings(fn, cuda: bool, args) -> dict:
    """do_bench's quantiles and the CUDA graph's time of one step (the wall clock without CUDA)."""
    if not cuda:
        return {"ms": _wall_ms(fn), "timer": "wall clock (no CUDA)"}
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, quantiles=[0.5, 0.2, 0.8])
    found = {"ms": median, "ms_p20": p20, "ms_p80": p80, "timer": "do_bench"}
    try:
        found["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=args.rep_ms, return_mode="median")
        found["launch_ms"] = median - found["graph_ms"]
    except Exception as err:  # a step that cannot be captured still has its do_bench time
        found["graph_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return found


def _roofline(row: dict, peaks: peaks_table.Peaks | None) -> dict:
    flops, nbytes = work(row["batch"], row["C"], row["size"] ** 2, 2 if row["dtype"] == "bf16" else 4, row["mode"])
    seconds = row["ms"] / 1e3
    found = {"tflops": flops / seconds / 1e12, "gbps": nbytes / seconds / 1e9}
    if peaks is not None:
        peak = peaks.bf16_tflops if row["dtype"] == "bf16" else peaks.tf32_tflops
        floor = max(flops / (peak * 1e12), nbytes / (peaks.hbm_tbps * 1e12))
        found["pct_floor"] = 100.0 * floor / seconds
    return found


def predicted(batch: int, blocks, device: str | None, l2_tbps: float) -> dict:
    """{(C, mode): traffic's predicted µs on `device`} for the fused and eager rows (bf16 channels_last)."""
    found = {}
    if device is None:
        return found
    for C, size in blocks:
        rows = traffic.block_rows(C, size, batch, l2_tbps)
        for impl, name in (("fused", "triton"), ("eager", "eager")):
            us = {r["direction"]: r[f"{device}_us"] for r in rows if r["impl"] == impl}
            found[(C, name, "fwd")] = us["fwd"]
            found[(C, name, "fwd+bwd")] = us["fwd"] + us["bwd"]
    return found


def trace(fn_by_impl: dict, path: Path, cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            for fn in fn_by_impl.values():
                fn()
        if cuda:
            torch.cuda.synchronize()
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def overhead_rows(out: RowWriter, blocks, cuda: bool, tiny: bool) -> None:
    try:
        from kernels import overhead
    except Exception as err:
        out.write(kind="overhead", error=f"{type(err).__name__}: {err}")
        return
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    for C, size in blocks:
        try:
            row = overhead.measure(C, size, 2 if tiny else 128, dtype, device, 5 if tiny else 300)
            out.write(kind="overhead", **row)
        except Exception as err:  # the kernels' launcher is another module's: its change must not stop the rows
            out.write(kind="overhead", C=C, error=f"{type(err).__name__}: {err}")


def run(args) -> int:
    from kernels import fused_pointwise_mlp

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("kernel_rows: needs a CUDA GPU (or --tiny under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "cpu"
    card = peaks_table.lookup(name)
    traffic_device = card.traffic_device if card else None
    out = RowWriter(args.jsonl, step="kernels")
    out.write(kind="device", **peaks_table.describe(name), torch=torch.__version__)
    blocks = TINY_BLOCKS if args.tiny else BLOCKS
    overhead_rows(out, blocks, cuda, args.tiny)
    batches = [2] if args.tiny else args.batch_sizes
    for batch in batches:
        for C, size in blocks:
            for r in traffic.block_rows(C, size, batch, args.l2_tbps):
                r.pop("per_kernel")
                out.write(kind="predicted", batch=batch, **r)
    measured = {}
    for n, (batch, layout, dtype_name) in enumerate(configurations(batches, args.tiny)):
        dtype = DTYPES[dtype_name]
        expect = predicted(batch, blocks, traffic_device, args.l2_tbps) if dtype_name == "bf16" else {}
        common = {"batch": batch, "layout": layout, "dtype": dtype_name, "fp32_as": "tf32"}
        with _fp32_precision("tf32"):
            for C, size in blocks:
                key = dict(common, block=f"C={C} {size}x{size}", C=C, size=size)
                out.write(kind="error", **key, **error_row(batch, C, size, dtype, layout, device))
                module, params, x, dy = _setup(batch, C, size, dtype, layout, device)
                impls = {"triton": lambda t, p=params: fused_pointwise_mlp(t, *p, relu_input=True),
                         "eager": module}
                steps = {}
                for mode in ("fwd", "fwd+bwd"):
                    for impl, fn in impls.items():
                        steps[(impl, mode)] = step = _step(fn, x, params, dy, mode)
                        step()  # Triton's compile and cuDNN's algorithm search outside the timing
                        row = dict(key, impl=impl, mode=mode, **timings(step, cuda, args))
                        row.update(_roofline(row, card))
                        if (C, impl, mode) in expect:
                            row[f"predicted_{traffic_device}_us"] = expect[(C, impl, mode)]
                        measured[(batch, layout, dtype_name, C, impl, mode)] = row["ms"]
                        out.write(kind="time", **row)
                if n == 0 and args.trace_dir:
                    path = Path(args.trace_dir) / f"C{C}-{dtype_name}-{layout}-b{batch}.trace.json.gz"
                    trace({impl: steps[(impl, "fwd+bwd")] for impl in impls}, path, cuda)
                    out.write(kind="trace", **key, path=str(path))
    for (batch, layout, dtype_name, C, impl, mode), ms in measured.items():
        if impl == "triton":
            eager = measured[(batch, layout, dtype_name, C, "eager", mode)]
            out.write(kind="speedup", batch=batch, layout=layout, dtype=dtype_name, C=C, mode=mode,
                      triton_ms=ms, eager_ms=eager, x_eager=eager / ms)
    print(f"kernel_rows: {out.count} rows in {args.jsonl}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nin_dist.bench.kernel_rows", description=__doc__.splitlines()[0])
    p.add_argument("--jsonl", required=True, metavar="PATH", help="append the rows here")
    p.add_argument("--trace-dir", metavar="DIR", help="one torch.profiler trace per block here")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--l2-tbps", type=float, default=5.5, help="the traffic model's L2 bandwidth, TB/s")
    p.add_argument("--tiny", action="store_true", help="the dry run: CPU, Triton's interpreter, tiny blocks")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
