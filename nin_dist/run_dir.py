"""The run's folder: a name and place every rank agrees on, one job at a time, and the files rank 0
writes there.

`open_run_dir` makes `run.out_dir` on global rank 0 and takes its lock (`run.lock`, an `flock` held
for the job's life, with the holder's pid and host written in it) before any data or model is
loaded; every rank learns the outcome, so a second job on a held folder stops on all its ranks with
one line naming the holder. The OS drops the lock when its process dies, so a torchrun restart takes
the folder back; a restarted rank 0 waits up to `RESTART_WAIT_S` for a holder of the same job
(same TORCHELASTIC_RUN_ID) to end. The lock file is never removed: removing it would let two jobs
lock two different files of one name.

It returns a `RunDir` on rank 0 and a `NullRunDir` with the same methods elsewhere, so the trainer
never tests the rank. `epochs.jsonl` gets a line per evaluated epoch as it happens (what nin-sweep
watches; metrics.json comes only at the end). Checkpoints (`checkpoints/`, see `nin_dist.checkpoint`)
and the tracking spool (`tracking-spool/`) live in the same folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

from nin_dist import distributed
from nin_dist.config import Config, dump_yaml, replace
from nin_dist.distributed import DistInfo
from nin_dist.errors import ConfigError, RunDirError, UserError
from nin_dist.tracking.redaction import redact_uri

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
EPOCHS_FILE = "epochs.jsonl"  # one JSON line per evaluated epoch, appended as the run goes
RESTART_WAIT_S = 30.0  # how long a restarted rank 0 waits for the same job's old rank 0 to end
HOLDER_WRITE_S = 2.0  # how long a just-taken lock may go without its holder written in it
_MAX_NAME_BYTES = 200  # one folder name, with room for the files made next to it
T = TypeVar("T")


def on_main(info: DistInfo, action: Callable[[], T]) -> T:
    """`action()` on global rank 0; its result, or the UserError it raised, on every rank."""
    result = None
    if info.is_main:
        try:
            result = action()
        except UserError as err:
            result = err
    result = distributed.broadcast_object(result)
    if isinstance(result, UserError):
        raise result
    return result


def check_name(name: str | None) -> None:
    """`run.name` is one folder name: not empty, no `/`, no control characters, not `.` or `..`."""
    if name is None:
        return
    if (not name or name in (".", "..") or "/" in name or any(ord(c) < 32 for c in name)
            or len(name.encode(errors="replace")) > _MAX_NAME_BYTES):
        raise ConfigError(f"run.name={name!r} is not allowed: one folder name of 1 to {_MAX_NAME_BYTES} bytes, "
                          f"without '/' or control characters, not '.' or '..'")


def default_name(run_id: str | None) -> str:
    """`nin-<run id>` for a torchrun job (the same on every restart); else a time stamp and a random suffix."""
    if run_id and run_id != "none":
        safe = quote(run_id, safe="")  # one-to-one: distinct ids stay distinct folders
        if len(safe) > 120:
            safe = f"{safe[:100]}-{hashlib.sha256(run_id.encode()).hexdigest()[:16]}"
        return f"nin-{safe}"
    return f"nin-{datetime.now():%Y%m%d-%H%M%S-%f}-{secrets.token_hex(4)}"


def resolve_run(cfg: Config) -> Config:
    """Give the run a name and folder that every rank agrees on and a torchrun restart finds again."""
    check_name(cfg.run.name)
    name = cfg.run.name
    if name is None:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if run_id == "none" and os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") != "0":
            log.warning("torchrun without --rdzv-id: a restart cannot find this run's folder again and starts "
                        "over; pass --rdzv-id (or set run.name / run.out_dir)")
        name = distributed.broadcast_object(default_name(run_id))
    out_dir = cfg.run.out_dir or str(Path("runs") / name)
    return replace(cfg, run={"name": name, "out_dir": out_dir})


def _cannot(path: Path, err: OSError) -> RunDirError:
    where = f": {err.filename}" if err.filename else ""
    return RunDirError(f"run.out_dir={path} cannot be written ({err.strerror or err}{where}); "
                       f"choose another run.out_dir")


class RunDir:
    """`run.out_dir` on rank 0: made and locked at the start, each file written whole (temp file, then rename)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def open(self, wait_s: float = RESTART_WAIT_S) -> None:
        """Make the folder and take its lock, held until `close` or the end of the process."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise _cannot(self.path, err) from None
        try:
            self._lock(fd, os.environ.get("TORCHELASTIC_RUN_ID"), wait_s)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _lock(self, fd: int, run_id: str | None, wait_s: float) -> None:
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as err:  # a filesystem without locks (ENOLCK, EOPNOTSUPP)
                log.warning("%s: cannot be locked (%s); nothing stops another job from using it",
                            self.path, err.strerror)
                return
            holder = read_holder(fd)
            same_job = run_id not in (None, "none") and holder.get("run_id") == run_id
            patience = wait_s if same_job else (0.0 if holder else HOLDER_WRITE_S)
            if time.monotonic() - started >= patience:
                raise RunDirError(
                    f"run.out_dir={self.path} is in use by another job (pid {holder.get('pid', '?')} on host "
                    f"{holder.get('host', '?')}); wait for it to end, or choose another run.out_dir or run.name")
            time.sleep(0.1)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                  "started": datetime.now().isoformat(timespec="seconds")}
        with contextlib.suppress(OSError):  # the lock is what counts; its text only names the holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)

    def close(self) -> None:
        """Release the lock (the file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_text(self, name: str, text: str) -> Path:
        """Write `name` in the folder; returns its path."""
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, target)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _cannot(self.path, err) from None
        return target

    def write_json(self, name: str, obj: dict) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def append_epoch(self, entry: dict) -> None:
        """One line of `epochs.jsonl` (`EPOCHS_FILE`): an evaluated epoch, as soon as it is scored, for
        whoever watches the run (nin-sweep prunes on it). A line is written whole, in one write;
        a restart after a crash may write an epoch's line again."""
        line = (json.dumps(entry) + "\n").encode()
        try:
            fd = os.open(self.path / EPOCHS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as err:
            raise _cannot(self.path, err) from None

    def write_config(self, cfg: Config) -> Path:
        """`config.yaml`: the resolved config, with the tracking URI's password replaced by `***`."""
        return self.write_text("config.yaml", dump_yaml(replace(cfg, tracking={"uri": redact_uri(cfg.tracking.uri)})))


def read_holder(fd: int) -> dict:
    """What the lock's holder wrote in it (pid, host, run_id, started); {} while it is not written yet."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


class NullRunDir(RunDir):
    """The same folder seen from ranks > 0: nothing is made, locked or written, paths are still answered."""

    def open(self, wait_s: float = RESTART_WAIT_S) -> None: ...

    def append_epoch(self, entry: dict) -> None: ...

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name


def make_run_dir(path: Path, info: DistInfo) -> RunDir:
    return RunDir(path) if info.is_main else NullRunDir(path)


@contextlib.contextmanager
def open_run_dir(path: Path, info: DistInfo) -> Iterator[RunDir]:
    """The run folder, made and locked by rank 0 before any work; every rank raises its error, if any."""
    run_dir = make_run_dir(path, info)
    fresh = info.is_main and not Path(path).exists()
    on_main(info, run_dir.open)
    try:
        yield run_dir
    except BaseException:
        # A run that stopped before writing anything (e.g. bad data) leaves no folder behind.
        if fresh and {p.name for p in Path(path).iterdir()} <= {LOCK_FILE}:
            run_dir.close()
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        run_dir.close()


__all__ = ["RunDir", "NullRunDir", "make_run_dir", "open_run_dir", "resolve_run", "on_main", "check_name",
           "default_name", "read_holder", "LOCK_FILE", "EPOCHS_FILE"]
