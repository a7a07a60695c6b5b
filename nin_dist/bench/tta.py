"""Time to accuracy: wall seconds from launch until the test (or validation) accuracy first reaches a target.

Each seed is a fresh `nin-train` process (its start-up and data loading count); the split targeted
(`--split`) is evaluated at every epoch end, and the trainer's metrics.json history gives when each
evaluation finished. Reports each seed and the median. `--split val` reads the images the config
holds out (`data.val_size`), so a recipe can be tuned without reading the test split; `--split test`
scores test every epoch whether or not the config holds images out.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from nin_dist.bench.common import add_config_arguments, format_table, machine, write_json
from nin_dist.bench.jobs import train_job
from nin_dist.config import load_config
from nin_dist.errors import UserError


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--target", default="0.91", help="accuracy to reach; comma-separated for several")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split whose accuracy is timed (val: the config's data.val_size held-out images)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")


def time_to_accuracy(config: str, seed: int, targets: list[float], overrides: list[str], out_dir: Path,
                     split: str = "test") -> dict:
    launched = time.time()
    every_epoch = ["train.eval_test_every_epoch=true"] if split == "test" else []  # with data.val_size too
    metrics = train_job(config, [f"seed={seed}", *every_epoch, *overrides], out_dir, what=f"tta run (seed {seed})")
    row = {"seed": seed, f"final_{split}_acc": metrics[f"{split}_acc"], "final_test_acc": metrics["test_acc"],
           "total_s": time.time() - launched}
    for target in targets:
        reached = next((h for h in metrics["history"] if h.get(f"{split}_acc", -1.0) >= target), None)
        row[f"tta_s@{target}"] = reached["time"] - launched if reached else None
        row[f"epoch@{target}"] = reached["epoch"] if reached else None
    return row


def median_time(times: list[float | None]) -> float | None:
    """Median with a seed that never reached the target counted as infinitely slow (None if that is the median)."""
    median = statistics.median(math.inf if t is None else t for t in times)
    return None if math.isinf(median) else median


def run(args) -> int:
    if args.split == "val" and load_config(args.config, args.overrides).data.val_size == 0:
        raise UserError(f"--split val: {args.config} holds no images out; add data.val_size=N (e.g. 5000)")
    targets = [float(t) for t in args.target.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(time_to_accuracy(args.config, seed, targets, args.overrides, Path(tmp) / str(seed),
                                         args.split))
            print(f"seed {seed}: {rows[-1]}", flush=True)
    print(f"time to {args.split} accuracy: {args.config} {' '.join(args.overrides)}")
    finals = ["final_val_acc", "final_test_acc"] if args.split == "val" else ["final_test_acc"]
    print(format_table(rows, ["seed", *(f"{k}@{t}" for t in targets for k in ("tta_s", "epoch")), *finals,
                              "total_s"]))
    medians = {}
    for target in targets:
        medians[target] = median_time([r[f"tta_s@{target}"] for r in rows])
        print(f"median time to {target}: " + (f"{medians[target]:.1f} s" if medians[target] is not None
                                              else "not reached by half the seeds or more"))
    write_json(args.json, {"benchmark": "tta", "machine": machine(), "config": args.config, "split": args.split,
                           "targets": targets, "overrides": args.overrides, "rows": rows, "median_s": medians})
    return 0
