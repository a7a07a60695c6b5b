"""Ablation: each recipe change's effect on validation accuracy, paired by seed against the base config.

    nin-bench ablate --config configs/X.yaml --seeds 0,1,2 --workers 2 \\
        --change "no smoothing: optim.label_smoothing=0" --change "no flip TTA: train.tta=false" [overrides...]

A change is `LABEL: key=value [key=value ...]` (without `LABEL:` its overrides name it). The base
(the config with the trailing overrides) and the base with each change are trained for every seed,
each run a real `nin-train` process with tracking off. `--workers K` runs K at once, each with
train.threads = cores // K unless the overrides set it (2 workers x 1 thread gave 1.54x the
throughput of 1 x 2 on 2 cores: BENCHMARKS.md, nin-bench sweep). The runs are queued seed by seed,
the variants of a seed side by side, so runs that are compared run at about the same time.

What is compared is the final validation accuracy: the base must hold out images (data.val_size > 0).
The test accuracy is reported beside it, never used to choose. Per variant: the val accuracy's mean
± sample sd over seeds; the change's delta vs the base, the mean of the per-seed differences (a seed
gives both runs the same initial weights and data order, so the pair cancels that seed's luck) ± the
differences' sample sd, and their standard error. Rule: a change is "within noise" when |mean delta|
<= the base's sd over seeds, i.e. its effect is no larger than the seed-to-seed spread of one run
(undefined with one seed). Bad `--change` syntax, an unknown key, a change that changes nothing or a
base without a validation split stop with one line before any training.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from nin_dist.bench.common import describe_cpu, format_table, machine, mean_sd, plus_minus, write_json
from nin_dist.bench.jobs import run_name, runs_folder, train_job
from nin_dist.config import flatten, load_config
from nin_dist.errors import ConfigError, UserError

BASE = "base"
NOISE_RULE = "within noise: |mean delta| <= the base's val accuracy sd over seeds"


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]  # on top of the base's


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/cpu.yaml", help="YAML config of the base (needs data.val_size > 0)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides of the base")
    p.add_argument("--change", action="append", default=[], metavar="'LABEL: key=value ...'",
                   help="a recipe change to measure: overrides on top of the base; give it once per change")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once")
    p.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                   help="threads in all, shared by the workers (default: the cores this process may use)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for BENCHMARKS.md)")
    p.add_argument("--out", metavar="DIR", help="keep every run's folder here, as INDEX-LABEL/seed-N "
                                               "(default: a temporary folder)")


def parse_change(text: str) -> Variant:
    """`no smoothing: optim.label_smoothing=0 train.tta=false` -> Variant; UserError naming the change if
    it is not `[LABEL:] key=value ...`. The label is what comes before the first `:` ahead of any `=`."""
    head, colon, tail = text.partition(":")
    label, rest = (head.strip(), tail) if colon and "=" not in head else ("", text)
    try:
        overrides = tuple(shlex.split(rest))
    except ValueError as err:  # an unclosed quote
        raise UserError(f"--change {text!r}: {err}") from None
    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if not overrides or bad:
        raise UserError(f"--change {text!r}: expected 'LABEL: key=value [key=value ...]' "
                        f"({'no overrides' if not overrides else f'{bad[0]!r} is not key=value'})")
    if "seed" in (o.partition("=")[0].strip() for o in overrides):
        raise UserError(f"--change {text!r}: the seeds come from --seeds, not a change")
    return Variant(label or " ".join(overrides), overrides)


def check(config: str, overrides: list[str], variants: list[Variant]) -> None:
    """Everything a run will be given, checked before the first one starts."""
    if "seed" in (o.partition("=")[0].strip() for o in overrides):
        raise UserError("the seeds come from --seeds, not an override")
    labels = [v.label for v in variants]
    if len(set(labels)) < len(labels):
        raise UserError(f"two variants share a label: {', '.join(labels)}")
    base = flatten(load_config(config, overrides))
    if base["data.val_size"] == 0:
        raise UserError(f"ablate compares validation accuracy: {config} holds no images out; "
                        f"add data.val_size=N (e.g. 5000)")
    for variant in variants[1:]:
        try:
            changed = flatten(load_config(config, [*overrides, *variant.overrides]))
        except ConfigError as err:
            raise ConfigError(f"--change {variant.label!r}: {err}") from None
        if changed == base:
            raise UserError(f"--change {variant.label!r} changes nothing: {config} with the overrides already "
                            f"has {' '.join(variant.overrides)}")
        if changed["data.val_size"] == 0:
            raise UserError(f"--change {variant.label!r} sets data.val_size=0: nothing left to compare")


def train_all(config: str, overrides: list[str], variants: list[Variant], seeds: list[int], workers: int,
              threads: int, folder: Path) -> dict[tuple[str, int], dict]:
    """Every (variant, seed) run, `workers` at a time: {(label, seed): its metrics.json}."""
    jobs = [(index, variant, seed) for seed in seeds for index, variant in enumerate(variants)]

    def job(index: int, variant: Variant, seed: int) -> dict:
        start = time.perf_counter()
        metrics = train_job(config, [f"train.threads={threads}", *overrides, *variant.overrides, f"seed={seed}"],
                            folder / run_name(index, variant.label) / f"seed-{seed}",
                            what=f"{variant.label!r} seed {seed}")
        print(f"{variant.label} seed {seed}: val {metrics['val_acc']:.4f} test {metrics['test_acc']:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        return metrics

    results = {}
    with ThreadPoolExecutor(workers) as pool:  # threads only wait: each run is a process of its own
        futures = {pool.submit(job, *j): (j[1].label, j[2]) for j in jobs}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the queued runs never start
            raise
    return results


def compare(variants: list[Variant], seeds: list[int], results: dict[tuple[str, int], dict]) -> list[dict]:
    """Per variant: val accuracy mean ± sd, test mean, and the deltas vs the base paired by seed."""
    base_val = [results[(BASE, s)]["val_acc"] for s in seeds]
    _, base_sd = mean_sd(base_val)
    rows = []
    for variant in variants:
        val = [results[(variant.label, s)]["val_acc"] for s in seeds]
        val_mean, val_sd = mean_sd(val)
        row = {"variant": variant.label, "overrides": list(variant.overrides), "val_acc": val,
               "val_acc_mean": val_mean, "val_acc_sd": val_sd,
               "test_acc_mean": mean_sd([results[(variant.label, s)]["test_acc"] for s in seeds])[0]}
        if variant.label != BASE:
            deltas = [v - b for v, b in zip(val, base_val, strict=True)]
            delta_mean, delta_sd = mean_sd(deltas)
            row |= {"deltas": deltas, "delta_mean": delta_mean, "delta_sd": delta_sd,
                    "delta_se": delta_sd / math.sqrt(len(deltas)) if delta_sd is not None else None,
                    "within_noise": abs(delta_mean) <= base_sd if base_sd is not None else None}
        rows.append(row)
    return rows


def shown(row: dict) -> dict:
    """A variant's row as the tables print it."""
    noise = row.get("within_noise")
    return {"variant": row["variant"], "overrides": " ".join(row["overrides"]) or "-",
            "val acc": plus_minus(row["val_acc_mean"], row["val_acc_sd"], 4),
            "delta vs base": plus_minus(row.get("delta_mean"), row.get("delta_sd"), 4, signed=True),
            "delta s.e.": "-" if row.get("delta_se") is None else f"{row['delta_se']:.4f}",
            "within noise": "-" if noise is None else ("yes" if noise else "no"),
            "test acc (mean)": f"{row['test_acc_mean']:.4f}"}


def markdown(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    for row in rows:
        cells = [f"`{row[c]}`" if c == "overrides" and row[c] != "-" else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {args.seeds}: expected comma-separated integers (e.g. 0,1,2)") from None
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seeds {args.seeds}: a seed given twice")
    if not 1 <= args.workers <= args.cores:
        raise UserError(f"--workers {args.workers} --cores {args.cores}: 1 <= workers <= cores")
    if not args.change:
        raise UserError("give at least one --change 'LABEL: key=value ...' to measure")
    variants = [Variant(BASE, ()), *(parse_change(text) for text in args.change)]
    check(args.config, args.overrides, variants)
    threads = args.cores // args.workers
    info = machine()
    with runs_folder(args.out) as folder:
        results = train_all(args.config, args.overrides, variants, seeds, args.workers, threads, folder)
    rows = compare(variants, seeds, results)
    print(f"\nablation of {args.config} {' '.join(args.overrides)}: final val accuracy, {len(seeds)} seeds "
          f"({args.seeds}), {args.workers} worker(s) x {threads} thread(s)")
    print(describe_cpu(info))
    table = [shown(r) for r in rows]
    print(format_table(table, list(table[0])))
    print(f"delta: the mean of the per-seed differences to the base ± their sample sd; {NOISE_RULE}; "
          f"test accuracy is reported, not used to choose")
    if args.markdown:
        print()
        print(markdown(table))
    write_json(args.json, {"benchmark": "ablate", "machine": info, "config": args.config,
                           "overrides": args.overrides, "seeds": seeds, "workers": args.workers,
                           "threads_per_run": threads, "noise_rule": NOISE_RULE, "variants": rows,
                           "runs": [{"variant": label, "seed": seed, "val_acc": m["val_acc"], "test_acc": m["test_acc"],
                                     "wall_s": m["wall_s"]} for (label, seed), m in sorted(results.items())]})
    return 0
