"""One trial as a process: a real nin-train job with the trial's values, started, watched and stopped.

`command` is `python -m nin_dist.train --config CFG <overrides> <the trial's key=value> run.out_dir=
<sweep>/trial-N run.name=trial-N tracking.parent_run_id=<parent>`, or the same under
`torchrun --standalone --nproc_per_node=K` (`--nproc-per-node K`): the trial's values come after the
command line's overrides, and the sweep's own keys last, so they win. The tracking URI, which may
hold a password, goes in the environment (MLFLOW_TRACKING_URI), never on the command line `ps` shows.
The folder and name depend only on the trial's number, so running a trial again (after its worker
died) resumes its checkpoint and its MLflow run.

The process gets a session of its own, so stopping a pruned trial signals torchrun and its workers
together: SIGTERM, on which nin-train ends its MLflow run KILLED (train.py), then SIGKILL after
`STOP_S`. On Linux it also gets SIGTERM when the sweep dies (PR_SET_PDEATHSIG), so a killed sweep
leaves no trial training on in its folder. Its output goes to `<sweep>/trial-N.log`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nin_dist.errors import RunDirError
from nin_dist.run_dir import LOCK_FILE, read_holder
from nin_dist.sweep.space import as_override
from nin_dist.tracking.redaction import redact_uris

log = logging.getLogger(__name__)

STOP_S = 60.0  # after SIGTERM: time to close the MLflow run (send what is queued) before SIGKILL
FREE_WAIT_S = 120.0  # how long a trial folder may stay locked (a trial of a killed sweep closing) before it is an error
PR_SET_PDEATHSIG = 1  # prctl(2): the signal this process gets when its parent dies


def command(config: str, overrides: list[str], values: dict, folder: Path, name: str, parent_run_id: str,
            nproc: int) -> list[str]:
    """The trial's command line (see the module doc)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    own = [f"run.out_dir={folder}", f"run.name={name}", f"tracking.parent_run_id={parent_run_id}"]
    return [*launcher, "-m", "nin_dist.train", "--config", str(config), *overrides,
            *(as_override(key, value) for key, value in values.items()), *own]


def _parent_death_signal():
    """A function for `preexec_fn` that asks Linux to SIGTERM the child when the sweep dies; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork, only called after it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the sweep died before the signal was armed
            os._exit(143)

    return arm


def wait_until_free(folder: Path, timeout_s: float = FREE_WAIT_S) -> None:
    """Return once no process holds the trial folder's lock (`run.lock`); RunDirError after `timeout_s`."""
    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return
    deadline = time.monotonic() + timeout_s
    with open(path, "rb") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                return
            except BlockingIOError:
                pass
            except OSError:  # a filesystem without locks: nothing to wait for
                return
            if time.monotonic() > deadline:
                holder = read_holder(f.fileno())
                raise RunDirError(f"{folder} is still in use by pid {holder.get('pid', '?')} on host "
                                  f"{holder.get('host', '?')} after {timeout_s:g} s; stop that job, then run the "
                                  f"sweep again")
            time.sleep(0.5)


class TrialProcess:
    """The running trial: its process (a session of its own) and its log file."""

    def __init__(self, cmd: list[str], log_path: Path, env: dict[str, str] | None = None):
        """`env`: variables added to the sweep's own (the trial's GPUs, its tracking URI: never in argv)."""
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)  # the sweep folder, made by the first trial
        with open(self.log_path, "ab") as out:  # the child keeps its own copy of the file
            # The command as run, but a tracking.uri's password as *** (the log is a file anyone may read).
            out.write(("$ " + redact_uris(" ".join(cmd)) + "\n").encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, preexec_fn=_parent_death_signal(),
                                         env=os.environ | (env or {}))

    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def _signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self, timeout_s: float = STOP_S) -> int:
        """SIGTERM the trial's process group, SIGKILL it after `timeout_s`; returns the exit code."""
        self._signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("sweep: trial pid %d did not end %g s after SIGTERM; killing it", self.proc.pid, timeout_s)
            self._signal(signal.SIGKILL)
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the trial's process group at once: it may not write anything more (another worker took
        its folder and MLflow run over)."""
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def last_line(self) -> str:
        """The last line the trial printed (its error, when it failed)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1].strip() if lines else ""
