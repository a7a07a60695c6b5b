"""Scaling: the same job as 1 process and as N torchrun processes (same global batch, same steps).

Each job is a real `torchrun --standalone` launch of `nin_dist.train` with `train.threads`
per process (default 1, so N processes use N cores and 1 process uses one); throughput is the
trainer's own epoch img/s. Efficiency = (img/s with N) / (N x img/s with 1). With `--bucket-mb`
several DDP bucket sizes are tried for the N-process job. Every job runs `--repeats` times,
interleaved; each repeat's speedup is against the 1-process job of that repeat, and the table shows
medians.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from nin_dist.bench import format_table, machine, median_of_repeats, write_json
from nin_dist.errors import UserError


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/cpu.yaml")
    p.add_argument("--nproc", type=int, default=2, help="processes of the scaled job")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per job")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--repeats", type=int, default=3, help="runs of every job, interleaved; the median is shown")
    p.add_argument("--bucket-mb", default="25", help="comma-separated DDP bucket sizes (MiB) to try")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def run_job(config: str, nproc: int, steps: int, threads: int, overrides: list[str], out_dir: Path) -> dict:
    """One torchrun job; returns its metrics.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nin_dist.train", "--config", config, f"train.max_steps={steps}", f"train.threads={threads}",
           "tracking.enabled=false", "train.progress=false", "run.resume=false", f"run.out_dir={out_dir}",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise UserError(f"scaling job with {nproc} processes failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads((out_dir / "metrics.json").read_text())


def run(args) -> int:
    buckets = args.bucket_mb.split(",")
    one_runs, many_runs = [], {bucket: [] for bucket in buckets}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # jobs interleaved: a burst of load hits one repeat, not one row
            one = run_job(args.config, 1, args.steps, args.threads, args.overrides, Path(tmp) / f"one{repeat}")
            one_runs.append({"processes": 1, "bucket_mb": "-", "img_per_s": one["img_per_s"], "speedup": 1.0,
                             "efficiency": 1.0})
            for bucket in buckets:
                many = run_job(args.config, args.nproc, args.steps, args.threads,
                               [*args.overrides, f"train.bucket_cap_mb={bucket}"], Path(tmp) / f"n{bucket}-{repeat}")
                # Against the 1-process job of the same repeat.
                speedup = many["img_per_s"] / one["img_per_s"]
                many_runs[bucket].append({"processes": args.nproc, "bucket_mb": bucket, "img_per_s": many["img_per_s"],
                                          "speedup": speedup, "efficiency": speedup / args.nproc})
    rows = [median_of_repeats(one_runs), *(median_of_repeats(many_runs[b]) for b in buckets)]
    print(f"scaling {args.config} {' '.join(args.overrides)}: {args.steps} steps, {args.threads} thread(s) "
          f"per process, gloo on CPU / nccl on GPU, median of {args.repeats}")
    print(format_table(rows, ["processes", "bucket_mb", "img_per_s", "speedup", "efficiency"]))
    write_json(args.json, {"benchmark": "scaling", "machine": machine(), "config": args.config,
                           "overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
                           "rows": rows})
    return 0
