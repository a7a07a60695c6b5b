"""Sweep throughput: trials per hour of one machine, 1 worker x all threads vs K workers x fewer threads.

    nin-bench sweep --trials 8 data.train_limit=2048 train.epochs=1     # 1 x 2 threads vs 2 x 1 on 2 cores

Each arrangement is a real `nin-sweep` of the same study settings (same config, overrides, search
space and sampler seed, so the same trial values) into a folder and sqlite MLflow store of its own:
`--workers 1` with `train.threads=C`, then `--workers K` with `train.threads=C/K`. Trials per hour =
trials / the sweep's wall seconds x 3600, start-up included (what a user waits for). Pruning is off
(`--startup-trials` above the trials), so both arrangements train every trial to the end. With
`--repeats`, the arrangements are interleaved and the table shows medians.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nin_dist.bench.common import add_config_arguments, format_table, machine, median_of_repeats, write_json
from nin_dist.bench.jobs import last_line
from nin_dist.errors import UserError


def add_arguments(p) -> None:
    add_config_arguments(p, repeats=1)
    p.add_argument("--trials", type=int, default=8, help="trials of each sweep")
    p.add_argument("--workers", type=int, default=2, help="workers of the parallel arrangement")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)), help="threads in all (default: "
                   "the cores this process may use)")


def sweep_job(config: str, overrides: list[str], trials: int, workers: int, threads: int, folder: Path) -> float:
    """One nin-sweep (run in `folder`, so the config's path is made absolute); its wall seconds."""
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "nin_dist.sweep", "--config", str(Path(config).resolve()), "--trials", str(trials),
           "--study", "bench", "--workers", str(workers), "--startup-trials", str(trials + 1), *overrides,
           f"train.threads={threads}",
           "train.progress=false", "tracking.system_metrics=false", "tracking.log_model=false",
           f"tracking.uri=sqlite:///{folder}/mlflow.db", f"run.out_dir={folder}/sweep"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env=os.environ.copy())
    if proc.returncode != 0:
        raise UserError(f"nin-sweep with {workers} worker(s) failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    return time.perf_counter() - start


def run(args) -> int:
    if args.workers < 2 or args.cores < args.workers or args.trials < 1:
        raise UserError(f"--workers {args.workers} --cores {args.cores} --trials {args.trials} is not allowed: "
                        f"2 <= workers <= cores, trials >= 1")
    arrangements = [(1, args.cores), (args.workers, args.cores // args.workers)]
    runs = {arrangement: [] for arrangement in arrangements}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):  # interleaved: a burst of load hits one repeat, not one row
            for workers, threads in arrangements:
                wall = sweep_job(args.config, args.overrides, args.trials, workers, threads,
                                 Path(tmp) / f"w{workers}-{repeat}")
                runs[(workers, threads)].append({"workers": workers, "threads_per_trial": threads,
                                                 "trials": args.trials, "wall_s": wall,
                                                 "trials_per_hour": args.trials / wall * 3600})
    rows = [median_of_repeats(runs[arrangement]) for arrangement in arrangements]
    rows[1]["speedup"] = rows[1]["trials_per_hour"] / rows[0]["trials_per_hour"]
    rows[0]["speedup"] = 1.0
    print(f"sweep {args.config} {' '.join(args.overrides)}: {args.trials} trials, {args.cores} threads in all, "
          f"median of {args.repeats}")
    print(format_table(rows, ["workers", "threads_per_trial", "trials", "wall_s", "trials_per_hour", "speedup"]))
    write_json(args.json, {"benchmark": "sweep", "machine": machine(), "config": args.config,
                           "overrides": args.overrides, "trials": args.trials, "repeats": args.repeats, "rows": rows})
    return 0
