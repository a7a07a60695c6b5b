"""The spool: tracking records kept in the run folder until they reach MLflow, and their replay.

The tracker's sender (`nin_dist.tracking.sender`) keeps here every record it cannot send now, with
the file or folder it names (records: `nin_dist.tracking.records`). Replaying sends them in call
order with `apply_record`, consecutive metric records of one run merged into one request, and
records its progress after each, so a replay stopped midway resumes where it stopped.

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

from nin_dist.errors import TrackingError, first_line
from nin_dist.tracking.records import apply_record, log_metric_records, refused
from nin_dist.tracking.redaction import redact_uri, storable_uri
from nin_dist.tracking.store import HttpBounds, check_reachable

log = logging.getLogger(__name__)

SPOOL_DIR = "tracking-spool"
METRIC_RECORDS_PER_BATCH = 100  # metric records (one step each) merged into one request on replay


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
            if self.pending() and old not in (None, storable_uri(uri)):
                raise TrackingError(f"{self.folder} holds unsent MLflow records for {old}; replay them first "
                                    f"(nin-train --sync-tracking {self.folder.parent}) or delete that folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            self.meta_path.write_text(json.dumps({"tracking_uri": storable_uri(uri)}) + "\n")

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
                group = _next_group(records, done)
                try:
                    if len(group) > 1:
                        log_metric_records(client, group)
                    else:
                        apply_record(client, group[0], self.folder)
                except Exception as err:
                    if not refused(err):
                        raise
                    log.error("tracking: the store refused %d kept %s record(s) (%s); dropped: %s", len(group),
                              group[0]["kind"], first_line(err), json.dumps(group[0])[:500])
                self.discard(group[0])
                done += len(group)
                sent += len(group)
                self._save_progress(done)

    def _save_progress(self, done: int) -> None:
        with self._lock:
            tmp = self.progress_path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"done": done}))
            os.replace(tmp, self.progress_path)

    def remove_if_idle(self) -> None:
        """Delete the spool folder when nothing in it waits to be sent."""
        with self._lock:
            if not self.pending():
                shutil.rmtree(self.folder, ignore_errors=True)


def _next_group(records: list[dict], start: int) -> list[dict]:
    """The records to send in one request from `start`: one record, or consecutive metric records
    of one run (up to METRIC_RECORDS_PER_BATCH), which go as one batch."""
    first = records[start]
    end = start + 1
    if first["kind"] == "metrics":
        while (end < len(records) and end - start < METRIC_RECORDS_PER_BATCH
               and records[end]["kind"] == "metrics" and records[end]["run_id"] == first["run_id"]):
            end += 1
    return records[start:end]


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
    with HttpBounds(timeout_s):
        check_reachable(uri, str(spool.meta_path), timeout_s)
        mlflow.set_tracking_uri(uri)
        try:
            sent = spool.replay(mlflow.MlflowClient(uri))
        except Exception as err:
            log.error("tracking: replay into %s stopped after a failure (%s); %d records still wait in %s",
                      redact_uri(uri), first_line(err), spool.pending(), spool.folder)
            return 1
    log.info("tracking: sent %d records from %s to %s", sent, spool.folder, redact_uri(uri))
    spool.remove_if_idle()
    return 0
