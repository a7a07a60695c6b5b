"""Where a training step's time goes on this machine: a profile window of a 2-process job, read back.

    nin-bench profile                                   # configs/cpu.yaml, 2 processes, ~1 minute
    nin-bench profile --nproc 1 --config configs/fast.yaml train.compile=false   # one GPU, eager

One torchrun job (`--nproc` processes, gloo on CPU) trains the config's network on its real batch:
`--warmup` steps, then `--repeats` times `--steps` steps unprofiled and the same number in a profile
window (nin_dist.profiling, as `train.profile_steps` makes it), each timed, so the cost of profiling
stands next to the steps it profiled. Rank 0 then reads the last window's traces (nin_dist.bench.trace):
each part of the step (k x k convs, 1x1 pairs, BatchNorm, pooling and loss, optimizer, the rest) with
its share of the step and its achieved FLOP/s against the GEMM peak measured in the same job (each
rank's own: a 1024^3 matmul on its threads, while the other ranks do the same); the gradient
all-reduce and how much of it runs while backward does; and, when the step is below 70% of the peak,
the part (and its top op) that keeps it there: the most time above what its FLOPs would take at 70%.
The parts are times of the training thread: on the CPU, the work itself; on CUDA, only the launching
(the kernels' own times are in the trace). A compiled model has no regions inside (dynamo drops them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nin_dist.bench.common import add_config_arguments, format_table, machine, write_json
from nin_dist.bench.trace import PARTS, analyze
from nin_dist.config import MAX_EPOCHS, load_config, replace

TARGET = 0.70  # of the GEMM peak: the step rate the table measures the parts against


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--nproc", type=int, default=2, help="processes of the job (the all-reduce needs 2 or more)")
    p.add_argument("--steps", type=int, default=3, help="steps of each window, and unprofiled steps before it")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled / profiled pairs, interleaved")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)  # internal: a rank of the job


def run(args) -> int:
    if args.worker:
        return _worker(args)
    cfg = load_config(args.config, args.overrides)  # a bad key is one line here, before the job starts
    with tempfile.TemporaryDirectory(prefix="nin-bench-profile-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "nin_dist.bench", "profile", "--worker", str(result_path), "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "train.progress=false", "tracking.enabled=false", f"run.out_dir={tmp}/run", *args.overrides]
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True)
        if proc.returncode != 0 or not result_path.exists():
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            print(f"nin-bench profile: the job failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        result = json.loads(result_path.read_text())
    result.update(config=args.config, overrides=args.overrides, machine=machine(), nproc=args.nproc)
    print(report(result, cfg.train.batch_size))
    write_json(args.json, {"benchmark": "profile", **result})
    return 0


def report(result: dict, batch: int) -> str:
    """The printed table and the lines under it."""
    trace, peak = result["ranks"][0], result["peak_gflops"]
    step_ms = trace["step_ms"]
    rows = []
    for part in PARTS:
        p = trace["parts"][part]
        rate = p["gflop"] / (p["ms"] / 1e3) if p["ms"] and p["gflop"] else None
        rows.append({"part": part, "ms/step": p["ms"], "share": f"{p['ms'] / step_ms:.1%}",
                     "GFLOP/step": p["gflop"] or "", "GFLOP/s": rate or "",
                     "of peak": f"{rate / peak:.1%}" if rate else "", "top op (self ms/step)":
                     ", ".join(f"{op} {ms:.2f}" for op, ms in p["top_ops"][:2])})
    total = sum(trace["parts"][p]["gflop"] for p in PARTS)
    rows.append({"part": "step", "ms/step": step_ms, "share": "100%", "GFLOP/step": total,
                 "GFLOP/s": total / (step_ms / 1e3), "of peak": f"{total / (step_ms / 1e3) / peak:.1%}"})
    cost = result["cost"]
    lines = [f"where a step's time goes: {result['config']} {' '.join(result['overrides'])}, "
             f"{result['nproc']} processes x {result['threads']} threads, global batch {batch}, "
             f"{result['precision']}, rank 0's trace of {trace['steps']} steps",
             f"device: {result['device']} ({result['machine']['cpu']}), GEMM peak per rank, measured in this job: "
             f"{peak:.1f} GFLOP/s ({result['precision']})", "",
             format_table(rows, ["part", "ms/step", "share", "GFLOP/step", "GFLOP/s", "of peak",
                                 "top op (self ms/step)"]), ""]
    for rank, r in enumerate(result["ranks"]):
        if r["allreduce_overlap"] is not None:
            lines.append(f"gradient all-reduce, rank {rank}: {r['allreduce_ms']:.2f} ms/step, "
                         f"{r['allreduce_overlap']:.0%} of it while backward computes (backward "
                         f"{r['backward_ms']:.1f} ms/step), {r['allreduce_ms'] * (1 - r['allreduce_overlap']):.2f} "
                         f"ms/step exposed")
    if result["device"].startswith("cuda"):
        lines.append("on CUDA the parts are the launching thread's times; the kernels' are in the trace")
    if not any(r["allreduce_overlap"] is not None for r in result["ranks"]):
        lines.append("gradient all-reduce: none (a world of one)")
    lines.append(result["holds_back"])
    ratio = cost["profiled_ms"] / cost["plain_ms"]
    lines.append(f"cost of profiling, {cost['steps']} steps x {cost['repeats']} in this job: unprofiled "
                 f"{cost['plain_ms']:.1f} ms/step, profiled {cost['profiled_ms']:.1f} ms/step ({ratio:.2f}x), "
                 f"writing the trace {cost['export_s']:.2f} s")
    return "\n".join(lines)


def holds_back(trace: dict, peak_gflops: float) -> str:
    """The part with the most time above what its FLOPs take at TARGET of the peak, and its top op."""
    total = sum(p["gflop"] for p in trace["parts"].values())
    achieved = total / (trace["step_ms"] / 1e3) / peak_gflops
    if achieved >= TARGET:
        return f"the step runs at {achieved:.0%} of the GEMM peak, above {TARGET:.0%}"
    excess = {name: p["ms"] - p["gflop"] / (TARGET * peak_gflops) * 1e3 for name, p in trace["parts"].items()}
    worst = max(excess, key=excess.get)
    op = trace["parts"][worst]["top_ops"][0] if trace["parts"][worst]["top_ops"] else ("?", 0.0)
    return (f"the step runs at {achieved:.0%} of the GEMM peak; what keeps it from {TARGET:.0%}: {worst}, "
            f"{excess[worst]:.1f} ms/step over its time at {TARGET:.0%} of peak, most of it in {op[0]} "
            f"({op[1]:.1f} ms/step self)")


# ---------------------------------------------------------------------------------------- one rank


def _worker(args) -> int:
    from nin_dist import distributed, precision
    from nin_dist.data import TrainBatches, find_root, load_split
    from nin_dist.layers import dropout_seed
    from nin_dist.model import build_model
    from nin_dist.optim import build_optimizer, build_scheduler
    from nin_dist.perf import peak_flops
    from nin_dist.profiling import make_window, trace_name
    from nin_dist.step import train_step
    from nin_dist.tracking import NullTracker

    cfg = load_config(args.config, args.overrides)
    info = distributed.init_distributed(cfg.train.device, cfg.train.threads, cfg.train.dist_timeout_s)
    cfg = precision.resolve_config(cfg, info.device)
    torch.manual_seed(cfg.seed)
    split = load_split(find_root(cfg.data), "train", limit=cfg.data.train_limit).to(info.device)
    batches = TrainBatches(split, cfg.data, cfg.train.batch_size, info.rank, info.world_size, cfg.seed)
    model = build_model(cfg.model, info.device).to(dtype=precision.param_dtype(cfg.train),
                                                   memory_format=precision.memory_format(cfg.train))
    opt = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(opt, cfg.optim, batches.steps_per_epoch, cfg.train.epochs)
    scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.train.precision == "fp16")
    ddp = distributed.wrap_ddp(model, info, cfg.train.bucket_cap_mb)
    endless = (b for epoch in range(MAX_EPOCHS) for b in batches.epoch(epoch))
    run_dir, done = Path(cfg.run.out_dir), 0

    def step() -> float:
        nonlocal done
        inputs, labels = next(endless)
        t0 = time.perf_counter()
        model.set_dropout_rows(info.rank * batches.local_batch, batches.global_batch, dropout_seed(cfg.seed, done))
        train_step(ddp, precision.prepare(inputs, cfg.train), labels, opt, scaler, scheduler, cfg, info.device)
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        done += 1
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    plain, profiled, export_s = [], [], []
    for _ in range(args.repeats):
        plain += [step() for _ in range(args.steps)]
        # The window as a run with train.profile_start = the next step makes it, over a run that does not end.
        window_cfg = replace(cfg, train={"profile_start": done + 1, "profile_steps": args.steps, "max_steps": None,
                                         "epochs": MAX_EPOCHS}, optim={"warmup_epochs": 0.0}).train
        window = make_window(window_cfg, info, run_dir, done, batches, NullTracker())
        for _ in range(args.steps):
            profiled.append(step())
            t0 = time.perf_counter()
            window.at(done)  # the last call writes the trace
        export_s.append(time.perf_counter() - t0)
    first = done - args.steps + 1
    distributed.barrier()
    peak = peak_flops(info.device, cfg.train.precision) / 1e9  # every rank at once, as they train
    if info.rank == 0:
        ranks = [analyze(run_dir / "profile" / trace_name(r, first, done)) for r in range(info.world_size)]
        result = {"device": str(info.device), "precision": cfg.train.precision, "threads": torch.get_num_threads(),
                  "peak_gflops": peak, "ranks": ranks,
                  "cost": {"steps": args.steps, "repeats": args.repeats, "plain_ms": 1e3 * statistics.median(plain),
                           "profiled_ms": 1e3 * statistics.median(profiled),
                           "export_s": statistics.median(export_s)},
                  "trace_files": [trace_name(r, first, done) for r in range(info.world_size)]}
        result["holds_back"] = holds_back(ranks[0], peak)
        Path(args.worker).write_text(json.dumps(result, default=str))
    distributed.destroy()
    return 0

