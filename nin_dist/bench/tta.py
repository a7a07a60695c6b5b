"""Time to accuracy: wall seconds from launch until the test accuracy first reaches a target.

Each seed is a fresh `nin-train` process (its start-up and data loading count); the test set is
evaluated at every epoch end, and the trainer's metrics.json history gives when each evaluation
finished. Reports each seed and the median.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from nin_dist.bench.common import add_config_arguments, format_table, machine, write_json
from nin_dist.bench.jobs import train_job


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--target", default="0.91", help="test accuracy to reach; comma-separated for several")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")


def time_to_accuracy(config: str, seed: int, targets: list[float], overrides: list[str], out_dir: Path) -> dict:
    launched = time.time()
    metrics = train_job(config, [f"seed={seed}", *overrides], out_dir, what=f"tta run (seed {seed})")
    row = {"seed": seed, "final_test_acc": metrics["test_acc"], "total_s": time.time() - launched}
    for target in targets:
        reached = next((h for h in metrics["history"] if h["test_acc"] >= target), None)
        row[f"tta_s@{target}"] = reached["time"] - launched if reached else None
        row[f"epoch@{target}"] = reached["epoch"] if reached else None
    return row


def median_time(times: list[float | None]) -> float | None:
    """Median with a seed that never reached the target counted as infinitely slow (None if that is the median)."""
    median = statistics.median(math.inf if t is None else t for t in times)
    return None if math.isinf(median) else median


def run(args) -> int:
    targets = [float(t) for t in args.target.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(time_to_accuracy(args.config, seed, targets, args.overrides, Path(tmp) / str(seed)))
            print(f"seed {seed}: {rows[-1]}", flush=True)
    print(f"time to test accuracy: {args.config} {' '.join(args.overrides)}")
    print(format_table(rows, ["seed", *(f"{k}@{t}" for t in targets for k in ("tta_s", "epoch")),
                              "final_test_acc", "total_s"]))
    medians = {}
    for target in targets:
        medians[target] = median_time([r[f"tta_s@{target}"] for r in rows])
        print(f"median time to {target}: " + (f"{medians[target]:.1f} s" if medians[target] is not None
                                              else "not reached by half the seeds or more"))
    write_json(args.json, {"benchmark": "tta", "machine": machine(), "config": args.config, "targets": targets,
                           "overrides": args.overrides, "rows": rows, "median_s": medians})
    return 0
