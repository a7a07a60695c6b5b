"""The spool: tracking records kept in the run folder until they reach MLflow, and their replay.

The tracker's sender (`nin_dist.tracking.sender`) keeps here every record it cannot send now, with
the file or folder it names (records: `nin_dist.tracking.records`). Replaying sends them in call
order with `apply_record`, consecutive metric records of one run merged into one request, and
records its progress after each, so a replay stopped midway resumes where it stopped.

`RUN_DIR/tracking-spool/`:
    run.json        {"tracking_uri": "..."}: the store the records belong to (never a password)
    records.jsonl   one JSON record per line, each ended by "\\n", in call order; each names its run id
    progress.json   {"done": N, "kept": [i, ...]}: lines 0..N-1 of records.jsonl are handled, and
                    of those, lines `kept` were not sent and stay (a replay stopped midway resumes)
    files/<id>/     staged artifact files, rendered reports, the saved model; a record's "file"
                    names its own, relative to the spool (`files/<id>/<name>`)

Run folders live on shared storage, so every file here is read as untrusted input:
- A line that is not a record (not UTF-8 JSON, not an object, an unknown kind or a missing field),
  whose file lies outside `files/` (symlinks resolved) or is no plain file or folder, or that the
  store rejects (HTTP 4xx), is *kept*: skipped with one warning, left in records.jsonl with its
  files, and `sync` exits 1. The records after it are still sent.
- Only what was sent is deleted: each sent record's `files/<id>/`, and at the end of a replay the
  lines of records.jsonl, less those kept. Blank lines carry nothing and go too.
- An append starts on a fresh line, so a line torn by a crash mid-write is only that one record
  (then kept, as a line that is not a record).
- records.jsonl, progress.json and run.json are read and written only as plain files, never
  through a symlink (the last two replaced whole). A model is sent as its files, never loaded.

`nin-train --sync-tracking RUN_DIR` (`nin_dist.tracking.replay`) replays it once the store is back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from nin_dist.errors import TrackingError
from nin_dist.tracking.records import (
    FILES,
    BadRecord,
    apply_record,
    log_metric_records,
    record_problem,
    refused,
    staged_path,
)
from nin_dist.tracking.redaction import redact_error, storable_uri

log = logging.getLogger(__name__)

SPOOL_DIR = "tracking-spool"
METRIC_RECORDS_PER_BATCH = 100  # metric records (one step each) merged into one request on replay


class Replay(NamedTuple):
    sent: int  # records sent (or found sent already)
    kept: int  # records not sent, kept in records.jsonl


def _read(path: Path) -> bytes | None:
    """A spool file's bytes, None when it is absent; TrackingError for a symlink or a non-file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise TrackingError(f"{path} cannot be read: {err.strerror} (a symlink is never followed)") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise TrackingError(f"{path} is not a plain file")
        return f.read()


def _replace(path: Path, data: bytes) -> None:
    """Write `path` whole: a fresh temporary file beside it, fsync, rename over it (a symlink there is
    replaced, never followed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse(line: bytes) -> dict:
    """The record on one line of records.jsonl; BadRecord when it is none."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRecord("not a JSON line (cut short by a crash mid-write, or not written by nin-train)") from None
    problem = record_problem(record)
    if problem:
        raise BadRecord(problem)
    return record


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
            if self.pending():
                old = self.tracking_uri()
                if old not in (None, storable_uri(uri)):
                    raise TrackingError(f"{self.folder} holds unsent MLflow records for {old}; replay them "
                                        f"first (nin-train --sync-tracking {self.folder.parent}) or delete that "
                                        f"folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            _replace(self.meta_path, (json.dumps({"tracking_uri": storable_uri(uri)}) + "\n").encode())

    def stage(self, name: str) -> Path:
        """A fresh path `files/<id>/<name>` (its folder exists) for a file or folder to send."""
        files = self.folder / FILES
        if files.is_symlink():
            raise OSError(f"{files} is a symlink; nothing is staged through it")
        folder = files / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        return folder / name

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.folder))

    def append(self, record: dict) -> None:
        """Add a record on a line of its own (after a torn last line too), and fsync."""
        line = json.dumps(record).encode() + b"\n"
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.records_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                size = os.fstat(fd).st_size
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError(f"{self.records_path} is not a plain file")
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = b"\n" + line
                while line:
                    line = line[os.write(fd, line):]
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self, record: dict) -> None:
        """Delete the staged `files/<id>/` of a record that has been sent (nothing outside `files/`)."""
        if "file" not in record:
            return
        try:
            staged_path(self.folder, record["file"])
        except BadRecord:
            return
        top = self.folder / FILES / Path(record["file"]).parts[1]
        if top.is_dir() and not top.is_symlink():
            shutil.rmtree(top, ignore_errors=True)
        else:
            top.unlink(missing_ok=True)

    # ---- reading

    def tracking_uri(self) -> str | None:
        """The store in run.json; None without run.json; TrackingError when it holds no URI."""
        data = _read(self.meta_path)
        if data is None:
            return None
        try:
            uri = json.loads(data.decode("utf-8"))["tracking_uri"]
        except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError):
            uri = None
        if not isinstance(uri, str) or not uri:
            raise TrackingError(f'{self.meta_path} is not {{"tracking_uri": "<MLflow URI>"}}: cannot tell which '
                                f"MLflow store the records belong to")
        return uri

    def _lines(self) -> list[bytes]:
        lines = (_read(self.records_path) or b"").split(b"\n")
        return lines[:-1] if lines[-1] == b"" else lines

    def _progress(self, lines: int) -> tuple[int, list[int]]:
        """(lines handled, lines kept among them); from the start when progress.json does not fit."""
        data = _read(self.progress_path)
        if data is None:
            return 0, []
        try:
            progress = json.loads(data.decode("utf-8"))
            done, kept = progress["done"], progress.get("kept", [])
            if (type(done) is int and 0 <= done <= lines and isinstance(kept, list)
                    and all(type(i) is int and 0 <= i < done for i in kept) and kept == sorted(set(kept))):
                return done, kept
        except (UnicodeDecodeError, ValueError, RecursionError, TypeError, KeyError, AttributeError):
            pass
        log.warning("tracking: %s does not fit %s; replaying from its first line (a record sent twice "
                    "changes nothing)", self.progress_path, self.records_path)
        return 0, []

    def pending(self) -> int:
        """Records not sent yet: those not replayed and those kept."""
        lines = self._lines()
        done, kept = self._progress(len(lines))
        return len(lines) - done + len(kept)

    # ---- replaying

    def replay(self, client, secrets: Sequence[str] = ()) -> Replay:
        """Send every pending record in order. A record unfit to send or rejected by the store is
        kept (one warning each). Raises on the first failure on the way, keeping the progress made."""
        sent = 0
        while True:
            with self._lock:
                lines = self._lines()
                done, kept = self._progress(len(lines))
                if done >= len(lines):
                    self._finish(lines, kept)
                    return Replay(sent, len(kept))
            while done < len(lines):
                group = []
                try:
                    group = self._next_group(lines, done)
                    if len(group) > 1:
                        log_metric_records(client, group)
                    elif group:
                        apply_record(client, group[0], self.folder)
                except Exception as err:
                    if not isinstance(err, BadRecord) and not refused(err):
                        raise
                    why = err if isinstance(err, BadRecord) else f"the store refused it ({redact_error(err, secrets)})"
                    log.warning("tracking: %s line %d kept, not sent: %s", self.records_path, done + 1, why)
                    kept.append(done)
                    self._save_progress(done + 1, kept)
                    done += 1
                    continue
                if group:
                    self.discard(group[0])
                done += max(1, len(group))
                sent += len(group)
                self._save_progress(done, kept)

    def _next_group(self, lines: list[bytes], start: int) -> list[dict]:
        """The records to send in one request from line `start`: none for a blank line, one record,
        or consecutive metric records of one run (up to METRIC_RECORDS_PER_BATCH) for one batch."""
        if not lines[start].strip():
            return []
        group = [_parse(lines[start])]
        if group[0]["kind"] != "metrics":
            return group
        for line in lines[start + 1: start + METRIC_RECORDS_PER_BATCH]:
            try:
                record = _parse(line)
            except BadRecord:
                break
            if record["kind"] != "metrics" or record["run_id"] != group[0]["run_id"]:
                break
            group.append(record)
        return group

    def _save_progress(self, done: int, kept: list[int]) -> None:
        with self._lock:
            _replace(self.progress_path, json.dumps({"done": done, "kept": kept}).encode())

    def _finish(self, lines: list[bytes], kept: list[int]) -> None:
        """Every line is handled: records.jsonl keeps only the kept lines. progress.json goes first,
        so a crash in between means a resend, never a lost line."""
        self.progress_path.unlink(missing_ok=True)
        if kept:
            _replace(self.records_path, b"".join(lines[i] + b"\n" for i in kept))
        else:
            self.records_path.unlink(missing_ok=True)

    def remove_if_idle(self) -> None:
        """Delete the spool folder when nothing in it waits to be sent."""
        with self._lock:
            if not self.pending():
                shutil.rmtree(self.folder, ignore_errors=True)
