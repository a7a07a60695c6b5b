"""Tracking records: what one tracker call sends, kept in the run folder when it cannot be sent.

Every tracker call becomes a *record* first: a small JSON dict, plus a file or folder staged under
`RUN_DIR/tracking-spool/files/` for artifacts and the model. `apply_record` sends records to MLflow;
the same function serves the live path and the replay, so a replayed run gets exactly what a live
one gets: metrics keep their step and original timestamp (MLflow ignores an exact duplicate, so
resending a record that did get through changes nothing), artifacts keep their paths, the end
status keeps its end time.

`RUN_DIR/tracking-spool/`:
    run.json        {"tracking_uri": ...}: the store the records belong to (never a password)
    records.jsonl   one record per line, in call order; each names its run id
    progress.json   {"done": N}: records already replayed (a replay stopped midway resumes there)
    files/<id>/     staged artifact files, rendered reports, the saved model

`nin-train --sync-tracking RUN_DIR` (`sync`) replays it once the store is back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from pathlib import Path

from nin_dist import tracking_store as store
from nin_dist.errors import TrackingError

log = logging.getLogger(__name__)

SPOOL_DIR = "tracking-spool"
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
METRIC_RECORDS_PER_BATCH = 100  # metric records (one step each) merged into one request on replay


# --------------------------------------------------------------------------- sending records

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


def _log_metric_records(client, records: list[dict]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(key, float(value), r["timestamp"], r["step"])
               for r in records for key, value in r["metrics"].items()]
    for lo in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(records[0]["run_id"], metrics=metrics[lo: lo + MAX_BATCH_METRICS])


def apply_record(client, record: dict, folder: Path) -> None:
    """Send one record with `client` (whose URI must also be MLflow's current tracking URI)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    kind, run_id = record["kind"], record["run_id"]
    if kind == "metrics":
        _log_metric_records(client, [record])
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


# --------------------------------------------------------------------------- the spool

class Spool:
    """Records kept in `RUN_DIR/tracking-spool/`. Thread-safe: appends and replays hold one lock."""

    def __init__(self, run_dir: Path):
        self.folder = Path(run_dir) / SPOOL_DIR
        self.records_path = self.folder / "records.jsonl"
        self.progress_path = self.folder / "progress.json"
        self.meta_path = self.folder / "run.json"
        self._lock = threading.Lock()

    # ---- writing

    def bind(self, uri: str) -> None:
        """Claim the spool for the store at `uri`; refuse if it holds records for another store."""
        with self._lock:
            old = self.tracking_uri()
            if self.pending() and old not in (None, _storable_uri(uri)):
                raise TrackingError(f"{self.folder} holds unsent MLflow records for {old}; replay them first "
                                    f"(nin-train --sync-tracking {self.folder.parent}) or delete that folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            self.meta_path.write_text(json.dumps({"tracking_uri": _storable_uri(uri)}) + "\n")

    def stage(self, name: str) -> Path:
        """A fresh path `files/<id>/<name>` (its folder exists) for a file or folder to send."""
        folder = self.folder / "files" / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder / name

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.folder))

    def append(self, record: dict) -> None:
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.records_path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def discard(self, record: dict) -> None:
        """Delete the staged file of a record that has been sent."""
        if "file" in record:
            shutil.rmtree(self.folder.joinpath(*Path(record["file"]).parts[:2]), ignore_errors=True)

    # ---- reading

    def tracking_uri(self) -> str | None:
        try:
            return json.loads(self.meta_path.read_text())["tracking_uri"]
        except (OSError, ValueError, KeyError):
            return None

    def _records(self) -> list[dict]:
        try:
            lines = self.records_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        records = []
        for n, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by a crash mid-write: nothing after it was written
                log.warning("tracking: %s line %d is incomplete; ignored", self.records_path, n)
        return records

    def _done(self) -> int:
        try:
            return int(json.loads(self.progress_path.read_text())["done"])
        except (OSError, ValueError, KeyError):
            return 0

    def pending(self) -> int:
        return max(0, len(self._records()) - self._done())

    # ---- replaying

    def replay(self, client) -> int:
        """Send every pending record in order; returns how many. Raises on the first failure,
        keeping the progress made so far."""
        sent = 0
        while True:
            with self._lock:
                records, done = self._records(), self._done()
                if done >= len(records):
                    self.records_path.unlink(missing_ok=True)
                    self.progress_path.unlink(missing_ok=True)
                    return sent
            while done < len(records):
                group = [records[done]]
                if group[0]["kind"] == "metrics":  # consecutive metric records go as one batch
                    while (done + len(group) < len(records) and len(group) < METRIC_RECORDS_PER_BATCH
                           and records[done + len(group)]["kind"] == "metrics"
                           and records[done + len(group)]["run_id"] == group[0]["run_id"]):
                        group.append(records[done + len(group)])
                try:
                    if len(group) > 1:
                        _log_metric_records(client, group)
                    else:
                        apply_record(client, group[0], self.folder)
                except Exception as err:
                    if not refused(err):
                        raise
                    log.error("tracking: the store refused %d kept %s record(s) (%s); dropped: %s", len(group),
                              group[0]["kind"], store.first_line(err), json.dumps(group[0])[:500])
                self.discard(group[0])
                done += len(group)
                sent += len(group)
                with self._lock:
                    tmp = self.progress_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps({"done": done}))
                    os.replace(tmp, self.progress_path)

    def remove_if_idle(self) -> None:
        """Delete the spool folder when nothing in it waits to be sent."""
        with self._lock:
            if not self.pending():
                shutil.rmtree(self.folder, ignore_errors=True)


def _storable_uri(uri: str) -> str:
    """The URI without a password (a replay takes credentials from MLflow's usual variables)."""
    password = store.uri_password(uri)
    return uri.replace(f":{password}@", "@", 1) if password else uri


def sync(run_dir: Path, uri: str | None = None, timeout_s: float = 30.0) -> int:
    """Replay `run_dir`'s spool into its MLflow run(s); 0 when all is sent, 1 when a record failed."""
    import mlflow

    spool = Spool(run_dir)
    if not Path(run_dir).is_dir():
        raise TrackingError(f"--sync-tracking {run_dir}: no such run folder")
    pending = spool.pending()
    if not pending:
        log.info("tracking: nothing to send in %s", spool.folder)
        spool.remove_if_idle()
        return 0
    uri = uri or spool.tracking_uri()
    if not uri:
        raise TrackingError(f"{spool.meta_path} is missing: cannot tell which MLflow store the records belong to")
    store.bound_http_calls(timeout_s)
    store.check_reachable(uri, str(spool.meta_path), timeout_s)
    mlflow.set_tracking_uri(uri)
    try:
        sent = spool.replay(mlflow.MlflowClient(uri))
    except Exception as err:
        log.error("tracking: replay into %s stopped after a failure (%s); %d records still wait in %s",
                  store.redact_uri(uri), store.first_line(err), spool.pending(), spool.folder)
        return 1
    log.info("tracking: sent %d records from %s to %s", sent, spool.folder, store.redact_uri(uri))
    spool.remove_if_idle()
    return 0
