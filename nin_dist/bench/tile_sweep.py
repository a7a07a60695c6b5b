"""The GPU visit's tile sweep: AOT-checked tile configs of each kernel, timed one by one, a row each.

    python -m nin_dist.bench.tile_sweep --jsonl DIR/tiles.jsonl                 # a GPU
    TRITON_INTERPRET=1 python -m nin_dist.bench.tile_sweep --jsonl F --tiny     # the dry run

For each NiN block (bf16, channels_last, batch 128: the training step's case) and each swept kernel
(the forward, and the backward's hidden, dx and dW kernels), first a "table" row: the dispatch
table's own plan timed. Then, per candidate config (block sizes, warps, stages):

1. `kernels.aot.compile_variant` compiles it for this card's architecture as the JIT would launch
   it (aligned channels_last specializations; in worker processes, ahead of the timing) and
   `kernels.aot.check` rules on it: a config that
   spills, leaves the tensor cores unused or overflows shared memory gets a row "rejected" with the
   reasons, and is not run;
2. a clean one runs through the launchers with the table's plan but this kernel's config
   (`pointwise_mlp.forward` / `backward` take the plan as an argument), do_bench times the forward
   or the whole backward, and the row gives its registers, spills, shared memory, ms, the ratio to
   the table's ms, and its largest difference from the table's output (tiles change the order of
   the sums, nothing else).

Candidates are ordered most plausible first, and taken rank by rank across the blocks and kernels
(each one's best, then each one's second ...), so the step's time limit cuts the least plausible;
every finished row stays on disk. `--tiny` (the dry run): C=16 at 4x4, batch 2, under Triton's
interpreter, one candidate for the forward and the hidden kernel compiled for sm_90 on the CPU, timed by the wall clock.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import multiprocessing
import os
import sys
import time

import torch

from nin_dist.bench.kernels import BLOCKS
from nin_dist.bench.rows import RowWriter

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Plan field -> (the kernel it configures, the names of its three block sizes)
KERNELS = {
    "fwd": ("_fwd_kernel", ("BLOCK_M", "BLOCK_H", "BLOCK_K")),
    "hidden": ("_bwd_hidden_kernel", ("BLOCK_M", "BLOCK_H", "BLOCK_K")),
    "dx": ("_bwd_dx_kernel", ("BLOCK_M", "BLOCK_I", "BLOCK_K")),
    "dw": ("_bwd_dw_kernel", ("BLOCK_O", "BLOCK_I", "BLOCK_M")),
}
TINY_KERNELS = ("fwd", "hidden")  # the dry run's: each AOT compile takes seconds on a CPU


def candidates(block_c: int, tiny: bool) -> list[tuple[int, int, int, int, int]]:
    """(three block sizes, warps, stages): 64-128 pixel tiles with 4-8 warps (wgmma wants >= 64 rows per
    4 warps) first, then wider channel chunks and deeper pipelines."""
    if tiny:
        return [(16, 16, 16, 4, 1)]
    found = []
    for a, b, k, warps, stages in itertools.product((64, 128), (32, 64, 128), (32, 64), (4, 8), (2, 3)):
        if b <= block_c and k <= block_c and not (a == 128 and warps == 4):
            found.append((a, b, k, warps, stages))
    return sorted(found, key=lambda c: (c[4], c[1] != 64, c[0] != 64, c))


def config(field: str, spec):
    from kernels import pointwise_mlp

    a, b, k, warps, stages = spec
    return pointwise_mlp.KernelConfig.make(num_warps=warps, num_stages=stages,
                                           **dict(zip(KERNELS[field][1], (a, b, k), strict=True)))


def variant(field: str, dtype: torch.dtype, cfg, block_c: int, precision: str):
    """The AOT variant of an aligned channels_last launch of this config, as kernels.ops lists its own."""
    from kernels import ops, pointwise_mlp

    kernel = KERNELS[field][0]
    constexprs = {"INPUT_PRECISION": precision, **({"BLOCK_C": block_c} if field == "fwd" else {})}
    meta = tuple(sorted(dict(cfg.meta, **constexprs).items()))
    return ops.Variant(kernel, dtype, meta, cfg.num_warps, cfg.num_stages, "channels_last", True,
                       pointwise_mlp.UNIT_STRIDES[kernel]["channels_last"],
                       pointwise_mlp.ALWAYS_DIVISIBLE + pointwise_mlp.ALIGNED_ARGS[kernel])


def aot_check(field: str, spec, dtype_name: str, block_c: int, precision: str, arch: int) -> dict:
    """kernels.aot's numbers and failed checks ("problems") of one config: run in a compile worker."""
    from kernels import aot

    row = aot.compile_variant(variant(field, DTYPES[dtype_name], config(field, spec), block_c, precision),
                              arch, aot.find_ptxas())
    keys = ("registers", "spill_bytes", "shared_bytes", "mma", "wgmma", "error")
    return {**{k: row[k] for k in keys if k in row}, "problems": aot.check(row)}


def compile_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Processes that compile configs while this one times them. Spawned, not forked (this process
    holds a CUDA context), and without TRITON_INTERPRET: the dry run's interpreted kernels cannot be
    compiled, so its workers import the compiled ones (this process's Triton stays interpreted)."""
    os.environ.pop("TRITON_INTERPRET", None)
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _timer(cuda: bool, args):
    if cuda:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms)

    def wall(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return wall


def run(args) -> int:
    from kernels import ops, pointwise_mlp

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("tile_sweep: needs a CUDA GPU (or --tiny under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    device, dtype_name = ("cuda", "bf16") if cuda else ("cpu", "fp32")  # the interpreter has no bf16
    dtype = DTYPES[dtype_name]
    major, minor = torch.cuda.get_device_capability() if cuda else (9, 0)
    arch = 10 * major + minor
    out = RowWriter(args.jsonl, step="tiles", device=torch.cuda.get_device_name() if cuda else "cpu")
    bench = _timer(cuda, args)
    batch, blocks = (2, ((16, 4),)) if args.tiny else (args.batch_size, BLOCKS[:3])  # not C=10: launch-bound
    fields = TINY_KERNELS if args.tiny else tuple(KERNELS)
    cases = []  # (key, field, table plan, its call for a plan, reference output, table ms)
    for C, size in blocks:
        torch.manual_seed(C)
        x = torch.randn(batch, C, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
        w1, w2 = (torch.randn(C, C, 1, 1, device=device, dtype=dtype) / C**0.5 for _ in range(2))
        b1, b2 = (torch.randn(C, device=device, dtype=dtype) for _ in range(2))
        table = ops.select_plan(x)
        y = pointwise_mlp.forward(x, w1, b1, w2, b2, True, table)
        dy = torch.randn_like(y)

        def call(field, plan, x=x, w1=w1, b1=b1, w2=w2, b2=b2, y=y, dy=dy):
            if field == "fwd":
                return lambda: pointwise_mlp.forward(x, w1, b1, w2, b2, True, plan)
            return lambda: pointwise_mlp.backward(dy, x, w1, b1, w2, y, True, plan)

        for field in fields:
            key = {"block": f"C={C} {size}x{size}", "C": C, "batch": batch, "kernel": KERNELS[field][0]}
            if not hasattr(table, field):  # the dispatch changed under this sweep: say so, go on
                out.write(kind="skipped", **key, note=f"the plan has no {field!r} entry")
                continue
            table_ms = bench(call(field, table))
            table_cfg = getattr(table, field).pick(True)
            out.write(kind="table", **key, config=dict(table_cfg.meta), warps=table_cfg.num_warps,
                      stages=table_cfg.num_stages, ms=table_ms)
            cases.append((key, field, table, call, call(field, table)(), table_ms))
    # every case's best-ranked candidate first, then every case's second ...: a cut keeps each case's best
    queue = [(case, spec) for rank in range(max(len(candidates(c[2].block_c, args.tiny)) for c in cases))
             for case in cases for spec in candidates(case[2].block_c, args.tiny)[rank:rank + 1]]
    with compile_pool(args.jobs) as pool:
        checks = [pool.submit(aot_check, case[1], spec, dtype_name, case[2].block_c, case[2].input_precision, arch)
                  for case, spec in queue]
        for ((key, field, table, call, reference, table_ms), spec), check in zip(queue, checks, strict=True):
            cfg = config(field, spec)
            row = dict(key, config=dict(cfg.meta), warps=cfg.num_warps, stages=cfg.num_stages, arch=f"sm_{arch}")
            try:
                found = check.result()
            except Exception as err:  # kernels.aot is another module's: a change there is a row, not a crash
                out.write(kind="failed", **row, error=f"aot: {type(err).__name__}: {str(err)[:300]}")
                continue
            problems = found.pop("problems")
            row.update(found)
            if problems:
                out.write(kind="rejected", **row, problems=problems)
                continue
            plan = dataclasses.replace(table, **{field: pointwise_mlp.Tiles(cfg, cfg)})
            try:
                result = call(field, plan)()
                ms = bench(call(field, plan))
            except Exception as err:  # a config the launcher refuses is a row too
                out.write(kind="failed", **row, error=f"{type(err).__name__}: {str(err)[:300]}")
                continue
            results = result if isinstance(result, tuple) else (result,)
            refs = reference if isinstance(reference, tuple) else (reference,)
            diff = max(float((r - s).abs().max()) for r, s in zip(results, refs, strict=True))
            out.write(kind="config", **row, ms=ms, x_table=table_ms / ms, max_abs_diff_vs_table=diff)
    print(f"tile_sweep: {out.count} rows in {args.jsonl}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nin_dist.bench.tile_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--jsonl", required=True, metavar="PATH", help="append the rows here")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup-ms", type=float, default=10.0)
    p.add_argument("--rep-ms", type=float, default=40.0)
    p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                   help="compile workers (AOT checks run ahead of the timing)")
    p.add_argument("--tiny", action="store_true", help="the dry run: CPU, Triton's interpreter, one tiny block")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
