"""Scaling: the same job as 1 process and as N torchrun processes (same global batch, same steps).

Each job is a real `torchrun --standalone` launch of `nin_dist.train` with `train.threads`
per process (default 1, so N processes use N cores and 1 process uses one); throughput is the
trainer's own epoch img/s. Efficiency = (img/s with N) / (N x img/s with 1). With `--bucket-mb`
several DDP bucket sizes are tried for the N-process job. Every job runs `--repeats` times,
interleaved; each repeat's speedup is against the 1-process job of that repeat, and the table shows
medians.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from nin_dist.bench.common import add_config_arguments, format_table, machine, median_of_repeats, write_json
from nin_dist.bench.jobs import train_job


def add_arguments(p) -> None:
    add_config_arguments(p, repeats=3)
    p.add_argument("--nproc", type=int, default=2, help="processes of the scaled job")
    p.add_argument("--steps", type=int, default=80, help="optimizer steps per job")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--bucket-mb", default="25", help="comma-separated DDP bucket sizes (MiB) to try")


def run_job(config: str, nproc: int, steps: int, threads: int, overrides: list[str], out_dir: Path) -> dict:
    """One torchrun job; returns its metrics.json."""
    return train_job(config, [f"train.max_steps={steps}", f"train.threads={threads}", *overrides], out_dir,
                     nproc=nproc, what=f"scaling job with {nproc} processes")


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
