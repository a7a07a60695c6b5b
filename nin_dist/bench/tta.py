"""Time to accuracy: training seconds (and wall seconds) until the test or validation accuracy first
reaches a target, for one config or several side by side.

    nin-bench tta --target 0.91 --seeds 0,1,2                    # configs/cpu.yaml
    nin-bench tta --config configs/cpu.yaml --config "configs/cpu.yaml optim.lr=0.1" --target 0.91

`--config` may be given several times; the first is the baseline. Each may carry overrides of its
own after its path (quoted as one argument); the trailing overrides apply to every config, and a
config's own win over them. Every (config, seed) is a fresh `nin-train` process, run interleaved
(seed 0 of each config, then seed 1 of each, ...), so a shared machine's drift hits every config alike.

The split targeted (`--split`) is evaluated at every epoch end; each run's metrics.json history
gives, per evaluation, the epoch's training seconds and when the evaluation ended. Per seed and target:
- `train_s`: seconds of training until the accuracy first reached the target, the sum of the trainer's
  per-epoch training seconds (`perf/epoch_s`) up to and including the epoch whose evaluation reached it.
  Evaluations, checkpoints and start-up are not in it: the recipe's own cost.
- `tta_s`: wall seconds from launch until that evaluation ended (start-up, data loading and
  evaluations included: what a user waits for).
Per config and target: `train_s` mean ± sd (sample sd) and median over seeds, the ratio of its median
to the baseline's, the median `tta_s`, and the final accuracy's mean ± sd. A seed that never reaches
the target leaves the mean undefined (shown as not reached) and counts as the slowest in the median.
`--split val` reads the images the config holds out (`data.val_size`), so a recipe can be tuned
without reading the test split; `--split test` scores test every epoch whether or not the config
holds images out.
"""

from __future__ import annotations

import math
import shlex
import statistics
import time
from pathlib import Path

from nin_dist.bench.common import describe_cpu, format_table, machine, mean_sd, plus_minus, write_json
from nin_dist.bench.jobs import run_name, runs_folder, train_job
from nin_dist.config import load_config
from nin_dist.errors import ConfigError, UserError

DEFAULT_CONFIG = "configs/cpu.yaml"


def add_arguments(p) -> None:
    p.add_argument("--config", action="append", dest="configs", metavar="CONFIG",
                   help=f"YAML config of the job, optionally with overrides of its own, quoted as one argument "
                        f"('{DEFAULT_CONFIG} optim.lr=0.1'); give it again to compare configs, the first is the "
                        f"baseline (default: {DEFAULT_CONFIG})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides of every config")
    p.add_argument("--target", default="0.91", help="accuracy to reach; comma-separated for several")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split whose accuracy is timed (val: the config's data.val_size held-out images)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", metavar="DIR", help="keep every run's folder here, as INDEX-CONFIG/seed-N "
                                               "(default: a temporary folder)")


def parse_config(text: str) -> tuple[str, list[str]]:
    """`configs/cpu.yaml optim.lr=0.1` -> the YAML path and the config's own overrides."""
    try:
        words = shlex.split(text)
    except ValueError as err:  # an unclosed quote
        raise UserError(f"--config {text!r}: not a path with key=value overrides ({err})") from None
    if not words:
        raise UserError("--config '': empty; give a YAML path")
    return words[0], words[1:]


def training_seconds(history: list[dict], split: str, target: float) -> dict | None:
    """The first evaluation of `split` that reached `target` (its history entry), with `train_s`: the
    training seconds of every epoch up to and including it; None if no evaluation reached it."""
    train_s = 0.0
    for entry in history:
        train_s += entry["epoch_s"]
        if entry.get(f"{split}_acc", -1.0) >= target:
            return entry | {"train_s": train_s}
    return None


def time_to_accuracy(config: str, own: list[str], seed: int, targets: list[float], overrides: list[str],
                     out_dir: Path, split: str = "test") -> dict:
    launched = time.time()
    every_epoch = ["train.eval_test_every_epoch=true"] if split == "test" else []  # with data.val_size too
    metrics = train_job(config, [f"seed={seed}", *every_epoch, *overrides, *own], out_dir,
                        what=f"tta run of {config} (seed {seed})")
    row = {"seed": seed, f"final_{split}_acc": metrics[f"{split}_acc"], "final_test_acc": metrics["test_acc"],
           "total_s": time.time() - launched}
    for target in targets:
        reached = training_seconds(metrics["history"], split, target)
        row[f"train_s@{target}"] = reached["train_s"] if reached else None
        row[f"tta_s@{target}"] = reached["time"] - launched if reached else None
        row[f"epoch@{target}"] = reached["epoch"] if reached else None
    return row


def median_time(times: list[float | None]) -> float | None:
    """Median with a seed that never reached the target counted as infinitely slow (None if that is the median)."""
    median = statistics.median(math.inf if t is None else t for t in times)
    return None if math.isinf(median) else median


def summarize(label: str, rows: list[dict], split: str, target: float) -> dict:
    """One config's numbers at one target, over its seeds' rows."""
    train_s = [r[f"train_s@{target}"] for r in rows]
    mean, sd = mean_sd(train_s)
    acc_mean, acc_sd = mean_sd([r[f"final_{split}_acc"] for r in rows])
    reached = sum(t is not None for t in train_s)
    return {"config": label, "target": target, "reached": reached, "seeds": len(rows),
            "train_s_mean": mean, "train_s_sd": sd, "train_s_median": median_time(train_s),
            "tta_s_median": median_time([r[f"tta_s@{target}"] for r in rows]),
            "final_acc_mean": acc_mean, "final_acc_sd": acc_sd,
            **({"note": f"not reached by {len(rows) - reached} of {len(rows)} seeds: the mean is undefined"}
               if reached < len(rows) else {})}


def check_configs(configs: list[tuple[str, str, list[str]]], overrides: list[str], split: str) -> None:
    """Every config loads with its overrides (and holds images out for --split val): before any run."""
    labels = [label for label, _, _ in configs]
    if len(set(labels)) < len(labels):
        raise UserError(f"--config given twice with the same text: {', '.join(labels)}")
    for label, path, own in configs:
        try:
            cfg = load_config(path, [*overrides, *own])
        except ConfigError as err:
            raise ConfigError(f"--config {label!r}: {err}") from None
        if split == "val" and cfg.data.val_size == 0:
            raise UserError(f"--split val: {label} holds no images out; add data.val_size=N (e.g. 5000)")


def run(args) -> int:
    configs = [(text, *parse_config(text)) for text in (args.configs or [DEFAULT_CONFIG])]
    check_configs(configs, args.overrides, args.split)
    try:
        targets = [float(t) for t in args.target.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError as err:
        raise UserError(f"--target {args.target} / --seeds {args.seeds}: comma-separated numbers ({err})") from None
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {args.seeds}: a seed given twice")
    info = machine()
    rows = []
    with runs_folder(args.out) as folder:
        for seed in seeds:  # interleaved: seed 0 of every config, then seed 1, ...
            for index, (label, path, own) in enumerate(configs):
                row = {"config": label, **time_to_accuracy(path, own, seed, targets, args.overrides,
                                                           folder / run_name(index, label) / f"seed-{seed}",
                                                           args.split)}
                rows.append(row)
                print(f"{label} seed {seed}: {row}", flush=True)
    print(f"\ntime to {args.split} accuracy; overrides of every config: {' '.join(args.overrides) or 'none'}")
    print(describe_cpu(info))
    finals = ["final_val_acc", "final_test_acc"] if args.split == "val" else ["final_test_acc"]
    print(format_table(rows, ["config", "seed", *(f"{k}@{t}" for t in targets for k in ("train_s", "tta_s", "epoch")),
                              *finals, "total_s"]))
    summary = []
    for target in targets:
        by_config = [summarize(label, [r for r in rows if r["config"] == label], args.split, target)
                     for label, _, _ in configs]
        baseline = by_config[0]["train_s_median"]
        for s in by_config:
            s["ratio_to_baseline"] = (s["train_s_median"] / baseline if None not in (s["train_s_median"], baseline)
                                      else None)
        summary += by_config
        print(f"\ntraining seconds to {args.split} accuracy {target} (mean ± sample sd over seeds; ratio: median "
              f"over the first config's median)")
        print(format_table([shown(s, args.split) for s in by_config],
                           ["config", "reached", "train_s", "train_s_median", "ratio", "wall_s_median", "final_acc"]))
    if any(s["reached"] < s["seeds"] for s in summary):
        print("not reached: a seed never reached the target, so the mean is undefined; the median counts it "
              "as the slowest ('-' when that is the median)")
    write_json(args.json, {"benchmark": "tta", "machine": info, "configs": [label for label, _, _ in configs],
                           "split": args.split, "targets": targets, "seeds": seeds, "overrides": args.overrides,
                           "rows": rows, "summary": summary})
    return 0


def shown(s: dict, split: str) -> dict:
    """A summary row as the table prints it."""
    def seconds(v):
        return "-" if v is None else f"{v:.1f}"

    train_s = (plus_minus(s["train_s_mean"], s["train_s_sd"], 1) if s["reached"] == s["seeds"]
               else f"not reached by {s['seeds'] - s['reached']} of {s['seeds']}")
    return {"config": s["config"], "reached": f"{s['reached']}/{s['seeds']}", "train_s": train_s,
            "train_s_median": seconds(s["train_s_median"]), "wall_s_median": seconds(s["tta_s_median"]),
            "ratio": "-" if s["ratio_to_baseline"] is None else f"{s['ratio_to_baseline']:.3f}",
            "final_acc": f"{split} {plus_minus(s['final_acc_mean'], s['final_acc_sd'], 4)}"}
