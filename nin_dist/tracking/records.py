"""Tracking records: what one is, which are fit to send, and sending one to MLflow.

Every tracker call becomes a *record* first: a small JSON dict naming its run id, plus a file or
folder staged in the spool (`nin_dist.tracking.spool`) for artifacts and the model. The kinds:

    metrics     {"step", "timestamp", "metrics": {key: value}}
    inputs      {"datasets": [{"dataset": MLflow's dataset fields, "context": "training" | "testing" | "validation"}]}
    artifact    {"file", "artifact_path"}: a file, or a folder logged as its contents
    model       {"file", "name", "step"}: an MLflow model saved by `nin_dist.tracking.saved_model`
    register    {"name", "model"}: the run's logged model `model` as a new version of registered
                model `name` (`nin_dist.tracking.registry`; a resend finds the version made before)
    terminate   {"status", "end_time"}

`apply_record` sends one; the live sender and the replay of a spool both use it, so a replayed run
gets exactly what a live one gets: metrics keep their step and original timestamp (MLflow ignores
an exact duplicate, so resending a record that did get through changes nothing), artifacts keep
their paths, the model is logged from its saved files (`nin_dist.tracking.saved_model`, never
loaded), the end status keeps its end time.

A spool may come from a run folder on shared storage, so a record is checked before anything is
sent: `record_problem` (the fields of its kind, with their types) and `staged_path` (its `file`, as
the spool names it, `files/<id>/...`, must lie inside the spool's `files/` folder once every
symlink is resolved, and hold plain files and folders only); a model must carry this project's own
served code, or be a plain network whose data is an exported graph and no pickle
(`saved_model.check_fit`: whoever loads it runs it). A record that fails raises
`BadRecord`: it is never worth sending as it is. `refused` tells a record the store rejected
(neither worth sending again) from one that failed on the way.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path, PurePosixPath

from nin_dist.errors import first_line
from nin_dist.tracking.registry import NothingToRegister, register_version
from nin_dist.tracking.saved_model import UnfitModel, log_saved_model, read_saved_model
from nin_dist.tracking.store import MAX_BATCH_METRICS

log = logging.getLogger(__name__)

FILES = "files"  # the spool's folder of staged files: every record's file lies below it
_NONE = type(None)
FIELDS = {  # kind -> its fields (besides "kind" and "run_id") and their JSON types
    "metrics": {"step": int, "timestamp": int, "metrics": dict},
    "inputs": {"datasets": list},
    "artifact": {"file": str, "artifact_path": (str, _NONE)},
    "model": {"file": str, "name": str, "step": int},
    "register": {"name": str, "model": str},
    "terminate": {"status": str, "end_time": int},
}
DATASET_FIELDS = {"name": str, "digest": str, "source_type": str, "source": str, "schema": (str, _NONE),
                  "profile": (str, _NONE)}  # MLflow's Dataset
INT64 = 1 << 63  # steps and times are 64-bit in MLflow's stores


class BadRecord(ValueError):
    """A record that cannot be sent as it is: malformed, or naming a file outside the spool."""


def _fits(value, types) -> bool:
    if isinstance(value, bool):  # a JSON true is no step, time or metric value
        return False
    if isinstance(value, int) and int in (types if isinstance(types, tuple) else (types,)):
        return -INT64 <= value < INT64
    return isinstance(value, types)


def record_problem(record) -> str | None:
    """What makes `record` (as parsed from JSON) unfit to send, or None when it is a record."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    kind = record.get("kind")
    if not isinstance(kind, str) or kind not in FIELDS:
        return f"unknown tracking record kind {kind!r}"
    if not isinstance(record.get("run_id"), str):
        return f"{kind} record without a run id"
    for field, types in FIELDS[kind].items():
        if field not in record:
            return f"{kind} record without {field!r}"
        if not _fits(record[field], types):
            return f"{kind} record whose {field!r} is {type(record[field]).__name__}"
    if kind == "metrics" and not all(isinstance(key, str) and _fits(value, (int, float))
                                     for key, value in record["metrics"].items()):
        return "metrics record with a key that is not a string or a value that is not a number"
    if kind == "inputs":
        for item in record["datasets"]:
            dataset = item.get("dataset") if isinstance(item, dict) else None
            if not (isinstance(dataset, dict) and isinstance(item.get("context"), str)
                    and set(dataset) <= set(DATASET_FIELDS)
                    and all(f in dataset for f in ("name", "digest", "source_type", "source"))
                    and all(_fits(v, DATASET_FIELDS[k]) for k, v in dataset.items())):
                return "inputs record with a dataset that is not MLflow's dataset fields and a context"
    return None


def staged_path(folder: Path, name: str) -> Path:
    """The file or folder a record names (`name`, relative to the spool `folder`), resolved; raises
    BadRecord unless it lies below `folder/files/` once every symlink is followed."""
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or len(parts) < 2 or parts[0] != FILES or ".." in parts:
        raise BadRecord(f"its file {name!r} is outside {FILES}/ (an absolute path, or one with '..')")
    root = folder.resolve() / FILES
    try:
        path = (folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte
        raise BadRecord(f"its file {name!r} cannot be resolved ({first_line(err)})") from None
    if path == root or not path.is_relative_to(root):
        raise BadRecord(f"its file {name!r} leads outside {root}")
    return path


def check_contents(path: Path, folder: Path) -> None:
    """Raise BadRecord unless `path` (from `staged_path`) is a plain file, or a folder holding only
    plain files, folders, and symlinks to plain files below `folder/files/`."""
    root = folder.resolve() / FILES
    entries = [path]
    if path.is_dir():
        for top, dirs, files in os.walk(path):  # symlinked folders are listed, never entered
            entries += [Path(top) / name for name in (*dirs, *files)]
    for entry in entries:
        target, shown = (entry.resolve() if entry.is_symlink() else entry), entry.relative_to(path.parent)
        if target != entry and not target.is_relative_to(root):
            raise BadRecord(f"{shown} leads outside {root}")
        mode = os.lstat(target).st_mode if target.exists() else 0
        if not (stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and target == entry)):
            raise BadRecord(f"{shown} is not a plain file or folder")


def log_metric_records(client, records: list[dict]) -> None:
    """Send metric records of one run together, in as few `log_batch` requests as MLflow allows."""
    from mlflow.entities import Metric

    metrics = [Metric(key, float(value), r["timestamp"], r["step"])
               for r in records for key, value in r["metrics"].items()]
    for lo in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(records[0]["run_id"], metrics=metrics[lo: lo + MAX_BATCH_METRICS])


def apply_record(client, record: dict, folder: Path) -> None:
    """Send one record with `client`; the files it names are under the spool `folder`. Raises
    BadRecord, having sent nothing, for a record unfit to send."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    problem = record_problem(record)
    if problem:
        raise BadRecord(problem)
    kind, run_id = record["kind"], record["run_id"]
    if kind == "metrics":
        log_metric_records(client, [record])
    elif kind == "inputs":
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**d["dataset"]), tags=[InputTag("mlflow.data.context", d["context"])])
            for d in record["datasets"]])
    elif kind in ("artifact", "model"):
        path = staged_path(folder, record["file"])
        if not path.exists():  # sent before a crash that came before its progress was saved
            log.warning("tracking: %s for run %s is gone from %s; skipped", kind, run_id, path)
            return
        check_contents(path, folder)
        if kind == "model":
            try:
                saved = read_saved_model(path)
            except Exception as err:  # the folder's own MLmodel, read here: any failure is the folder's
                raise BadRecord(f"its model {record['file']} has no readable MLmodel ({first_line(err)})") from None
            try:
                log_saved_model(client, run_id, path, saved, record["name"], record["step"])
            except UnfitModel as err:  # tampered with, or another version's: nothing was sent
                raise BadRecord(f"its model {record['file']}: {err}") from None
        elif path.is_dir():
            client.log_artifacts(run_id, str(path), record["artifact_path"])
        else:
            client.log_artifact(run_id, str(path), record["artifact_path"])
    elif kind == "register":
        try:
            version = register_version(client, run_id, record["name"], record["model"])
        except NothingToRegister as err:  # its model record was kept unsent: this one cannot go before it
            raise BadRecord(str(err)) from None
        log.info("tracking: the model of run %s is version %s of registered model %r", run_id, version.version,
                 version.name)
    else:
        client.set_terminated(run_id, record["status"], record["end_time"])


def refused(err: BaseException) -> bool:
    """True when the store answered and rejected the record itself (HTTP 4xx other than 429):
    sending it again cannot succeed, unlike after a lost connection or a 5xx."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status != 429
