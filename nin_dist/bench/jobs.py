"""Benchmarks that time whole runs start `nin-train` as a fresh process (or torchrun job) and read
back its metrics.json; this is that one command, and the folder such runs are written to."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nin_dist.errors import UserError, first_line


def train_job(config: str, overrides: list[str], out_dir: Path, nproc: int | None = None, what: str = "job") -> dict:
    """Run `nin-train --config CONFIG OVERRIDES` into `out_dir`, tracking and progress bar off, never
    resuming; returns its metrics.json. With `nproc` it is a `torchrun --standalone` job of that many
    processes, else one plain process."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    cmd = [*launcher, "-m", "nin_dist.train", "--config", config, "tracking.enabled=false", "train.progress=false",
           "run.resume=false", f"run.out_dir={out_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise UserError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr)}")
    return json.loads((out_dir / "metrics.json").read_text())


def last_line(output: str) -> str:
    """The last line a failed child printed (its one-line error, or the end of its traceback)."""
    lines = output.strip().splitlines()
    return first_line(lines[-1]) if lines else "no output"


@contextlib.contextmanager
def runs_folder(keep: str | None) -> Iterator[Path]:
    """Where a benchmark's runs go: `keep` (made if missing, and kept: each run's config.yaml and
    metrics.json can be read afterwards), else a temporary folder removed at the end. A `keep`
    folder must be empty, so every run in it is from this benchmark."""
    if keep is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    path = Path(keep)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(f"--out {keep}: must be an empty or new folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {keep}: cannot make it ({err.strerror})") from None
    yield path


def run_name(index: int, label: str) -> str:
    """A folder name for the `index`-th variant of a benchmark, readable from its label: `1-no-smoothing`."""
    return f"{index}-{re.sub(r'[^A-Za-z0-9_.=-]+', '-', label).strip('-')[:80]}"
