"""Sending one tracking record to MLflow.

Every tracker call becomes a *record* first: a small JSON dict naming its run id, plus a file or
folder staged in the spool (`nin_dist.tracking.spool`) for artifacts and the model. The kinds:

    metrics     {"step", "timestamp", "metrics": {key: value}}
    inputs      {"datasets": [{"dataset": MLflow's dataset fields, "context": "training" | "testing"}]}
    artifact    {"file", "artifact_path"}: a file, or a folder logged as its contents
    model       {"file", "name", "step"}: a model saved with `mlflow.pytorch.save_model`
    terminate   {"status", "end_time"}

`apply_record` sends one; the live sender and the replay of a spool both use it, so a replayed run
gets exactly what a live one gets: metrics keep their step and original timestamp (MLflow ignores
an exact duplicate, so resending a record that did get through changes nothing), artifacts keep
their paths, the end status keeps its end time. `refused` tells a record the store rejected (never
worth sending again) from one that failed on the way.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (given, so MLflow does not probe imports)."""
    import mlflow.pytorch

    return mlflow.pytorch.get_default_pip_requirements()


def log_saved_model(run_id: str, folder: Path, name: str, step: int) -> None:
    """Log a model saved with `mlflow.pytorch.save_model` as the run's model (an MLflow LoggedModel)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import Model

    # The LoggedModel goes into the experiment MLflow considers active: make that the run's.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    saved = Model.load(str(folder))
    mlflow.pytorch.log_model(mlflow.pytorch.load_model(str(folder)), name=name, signature=saved.signature,
                             input_example=saved.load_input_example(str(folder)),
                             pip_requirements=model_requirements(), step=step, run_id=run_id)


def log_metric_records(client, records: list[dict]) -> None:
    """Send metric records of one run together, in as few `log_batch` requests as MLflow allows."""
    from mlflow.entities import Metric

    metrics = [Metric(key, float(value), r["timestamp"], r["step"])
               for r in records for key, value in r["metrics"].items()]
    for lo in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(records[0]["run_id"], metrics=metrics[lo: lo + MAX_BATCH_METRICS])


def apply_record(client, record: dict, folder: Path) -> None:
    """Send one record with `client` (whose URI must also be MLflow's current tracking URI); the
    files it names are under `folder`."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    kind, run_id = record["kind"], record["run_id"]
    if kind == "metrics":
        log_metric_records(client, [record])
    elif kind == "inputs":
        client.log_inputs(run_id, datasets=[
            DatasetInput(Dataset(**d["dataset"]), tags=[InputTag("mlflow.data.context", d["context"])])
            for d in record["datasets"]])
    elif kind in ("artifact", "model"):
        path = folder / record["file"]
        if not path.exists():
            log.warning("tracking: %s for run %s is gone from %s; skipped", kind, run_id, path)
        elif kind == "model":
            log_saved_model(run_id, path, record["name"], record["step"])
        elif path.is_dir():
            client.log_artifacts(run_id, str(path), record["artifact_path"])
        else:
            client.log_artifact(run_id, str(path), record["artifact_path"])
    elif kind == "terminate":
        client.set_terminated(run_id, record["status"], record["end_time"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}")


def refused(err: BaseException) -> bool:
    """True when the store answered and rejected the record itself (HTTP 4xx other than 429):
    sending it again cannot succeed, unlike after a lost connection or a 5xx."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    status = err.get_http_status_code()
    return 400 <= status < 500 and status != 429
