"""`nin-eval MODEL`: score a trained model on the test (or validation) split, the way its run scored it.

    nin-eval models:/m-<id>                       # a LoggedModel that nin-train logged
    nin-eval models:/fashion-nin@champion         # a registered model's version, by alias (or /VERSION)
    nin-eval runs:/<run_id>/model                 # a run's model, as MLflow resolves it
    nin-eval runs/NAME/checkpoints/last.pt        # a checkpoint (or its run folder runs/NAME)
    nin-eval MODEL --split val --json eval.json train.tta=true data.root=DIR
    nin-eval MODEL --predictions predictions.csv  # and each image's predicted class and probabilities

The data, its preprocessing and the evaluation settings (`data.*`, `seed`, `train.tta`,
`train.eval_batch_size`, `train.precision`) are the model's own run's (`nin_dist.model_source`), so
on the same data the command gives exactly the run's `test/acc`; `key=value` overrides apply on top,
and `--config` replaces the stored config (a checkpoint without its run folder). It prints the loss,
the accuracy, the accuracy of each class and the confusion matrix, writes the same numbers to
`--json PATH` (and with `--predictions PATH` a CSV of every image: its true label, the predicted
label and class name, and the class probabilities, as the served model answers them), and with
tracking on (`tracking.enabled`, `tracking.uri` or `$MLFLOW_TRACKING_URI`, as for nin-train; MLflow
models are looked up there too) logs an evaluation run linked to the model
(`nin_dist.tracking.evaluation`). Exit codes: 0 done, 2 user error (one line), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from nin_dist import distributed, precision
from nin_dist.config import Config, load_config
from nin_dist.data import CLASSES, Split, hold_out, load_datasets
from nin_dist.errors import ConfigError, ModelError, UserError, report
from nin_dist.evaluate import Evaluation, evaluate
from nin_dist.logs import init_logging
from nin_dist.model_source import OpenedModel, open_model
from nin_dist.tracking.report import confusion_matrix, per_class_rows
from nin_dist.tracking.store import resolve_uri

log = logging.getLogger("nin_dist.eval")

STORED_SECTIONS_LEFT_OUT = ("tracking", "run")  # this command's own (see nin_dist.model_source)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nin-eval", description=__doc__.splitlines()[0])
    parser.add_argument("model", metavar="MODEL",
                        help="models:/m-<id>, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/<id>/model, "
                             "or a checkpoint path (or run folder)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the split scored (val: the data.val_size images the run held out)")
    parser.add_argument("--json", metavar="PATH", help="write the results here (atomically)")
    parser.add_argument("--predictions", metavar="PATH",
                        help="write each image's true label, predicted label, class name and probabilities (CSV)")
    parser.add_argument("--config", help="YAML config to use instead of the one stored with the model")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return parser.parse_intermixed_args(argv)  # options before, between or after the overrides


def tracking_settings(config: str | None, overrides: list[str]):
    """`tracking.*` of --config and the overrides alone: where to look for an MLflow model, before
    its config is known (the other keys are checked with the stored config, later)."""
    others = tuple(f.name for f in dataclasses.fields(Config) if f.name != "tracking")
    return load_config(config, [o for o in overrides if o.strip().startswith("tracking.")], others).tracking


def check_json_path(path: str | None, flag: str = "--json") -> Path | None:
    """An output PATH (--json, --predictions), checked before any work: its folder exists and PATH is not a folder."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if target.is_dir() or not target.parent.is_dir():
        raise UserError(f"{flag} {path}: " + ("is a folder" if target.is_dir() else "its folder does not exist"))
    return target


def eval_split(cfg: Config, which: str) -> Split:
    """The split scored: the test split, or the validation images `hold_out` chose for the run."""
    if which == "val" and cfg.data.val_size == 0:
        raise ConfigError("--split val: the model's config holds no images out (data.val_size=0); "
                          "use --split test or set data.val_size=N as the run did")
    train, test = load_datasets(cfg.data)
    return test if which == "test" else hold_out(train, cfg.data.val_size, cfg.seed)[1]


def metric_name(class_name: str) -> str:
    """`T-shirt/top` -> `t_shirt_top`: a class name as one MLflow metric key segment."""
    return re.sub(r"[^a-z0-9]+", "_", class_name.lower()).strip("_")


def results(source, split: Split, which: str, cfg: Config, scored: Evaluation) -> dict:
    """The JSON report: loss, accuracy, per-class accuracy and the confusion matrix (rows true class)."""
    cm = confusion_matrix(split.labels.cpu().numpy(), scored.predictions.cpu().numpy())
    per_class = [{"class": k, "name": name, "images": n, "correct": c, "acc": a}
                 for k, name, n, c, a in per_class_rows(cm)]
    return {"model": source.uri, "model_id": source.model_id, "source_run_id": source.run_id, "split": which,
            "dataset": split.dataset_name, "images": scored.count, "tta": cfg.train.tta,
            "loss": scored.loss, "acc": scored.acc, "classes": list(CLASSES), "per_class": per_class,
            "confusion_matrix": cm.tolist()}


def metrics(result: dict) -> dict[str, float]:
    split = result["split"]
    out = {f"{split}/loss": result["loss"], f"{split}/acc": result["acc"]}
    return out | {f"{split}/class_acc/{metric_name(row['name'])}": row["acc"] for row in result["per_class"]}


def format_report(result: dict) -> str:
    """The printed form: a summary line, per-class accuracy, then the confusion matrix."""
    split, cm = result["split"], np.array(result["confusion_matrix"])
    lines = [f"{result['model']}: {split} loss {result['loss']:.4f}  acc {result['acc']:.4f}  "
             f"({result['images']} images of {result['dataset']}, tta {'on' if result['tta'] else 'off'})", ""]
    width = max(len(name) for name in CLASSES)
    lines.append(f"{'class':<{width}}  images  correct     acc")
    lines += [f"{r['name']:<{width}}  {r['images']:>6}  {r['correct']:>7}  {r['acc']:.4f}" for r in result["per_class"]]
    cell = max(4, len(str(cm.max())) + 1)
    lines += ["", f"confusion matrix (rows: true class, columns: predicted class {', '.join(map(str, range(10)))})",
              f"{'':<{width + 4}}" + "".join(f"{k:>{cell}}" for k in range(len(CLASSES)))]
    lines += [f"{k} {name:<{width}}  " + "".join(f"{n:>{cell}}" for n in row)
              for k, (name, row) in enumerate(zip(CLASSES, cm.tolist(), strict=True))]
    return "\n".join(lines)


def predictions_csv(split: Split, scored: Evaluation) -> str:
    """One row per image: image (index in the split), true_label, label (predicted), class_name, p0..p9;
    probabilities as the shortest text that reads back to the same fp32 value."""
    header = ["image", "true_label", "label", "class_name", *(f"p{k}" for k in range(len(CLASSES)))]
    rows = [",".join(header)]
    for i, (true, label, p) in enumerate(zip(split.labels.tolist(), scored.predictions.tolist(),
                                             scored.probabilities.cpu().tolist(), strict=True)):
        rows.append(",".join([str(i), str(true), str(label), f'"{CLASSES[label]}"', *map(repr, p)]))
    return "\n".join(rows) + "\n"


def write_atomically(path: Path, text: str, flag: str = "--json") -> None:
    """Write `text` to `path` through a temp file in its folder: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"{flag} {path}: cannot be written ({err.strerror or err})") from None


def run(args: argparse.Namespace, folder: Path) -> int:
    json_path = check_json_path(args.json)
    predictions_path = check_json_path(args.predictions, "--predictions")
    tracking = tracking_settings(args.config, args.overrides)
    opened: OpenedModel = open_model(args.model, resolve_uri(tracking.uri)[0], folder)
    if args.config is None and opened.config_path is None:
        where = "in its run folder" if opened.loaded is None else "among its run's MLflow artifacts"
        raise ModelError(f"MODEL {opened.source.uri}: no config.yaml {where}; pass the config it was trained "
                         f"with (--config)")
    cfg = load_config(args.config or opened.config_path, args.overrides,
                      () if args.config else STORED_SECTIONS_LEFT_OUT)
    info = distributed.init_distributed(cfg.train.device, cfg.train.threads)
    if info.world_size > 1:
        raise UserError("nin-eval runs as one process: start it without torchrun")
    precision.check_device(cfg.train, info.device)
    cfg = opened.eval_config(precision.resolve_config(cfg, info.device))
    split = eval_split(cfg, args.split).to(info.device)
    model = opened.build(cfg, info.device)

    from nin_dist.tracking.evaluation import start_evaluation_run

    name = f"eval-{opened.source.model_id or opened.source.run_id or Path(opened.source.uri).stem}"
    tracked, status = start_evaluation_run(cfg, info, opened.source, name), "FAILED"
    try:
        scored = evaluate(model, split, cfg.data, cfg.train, info, with_predictions=True)
        result = results(opened.source, split, args.split, cfg, scored) | {"mlflow_run_id": tracked.run_id}
        print(format_report(result), flush=True)
        text = json.dumps(result, indent=2) + "\n"
        report_path = json_path or folder / "evaluation.json"
        write_atomically(report_path, text)
        if json_path is not None:
            log.info("wrote %s", json_path)
        if predictions_path is not None:
            write_atomically(predictions_path, predictions_csv(split, scored), "--predictions")
            log.info("wrote %s", predictions_path)
        tracked.log(split, metrics(result), report_path)
        status = "FINISHED"
    finally:
        tracked.close(status)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    init_logging(0)
    try:
        with tempfile.TemporaryDirectory(prefix="nin-eval-") as folder:
            return run(args, Path(folder))
    except UserError as err:
        return report("nin-eval", err)
    finally:
        distributed.destroy()


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
