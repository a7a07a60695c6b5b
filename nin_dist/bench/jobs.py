"""Benchmarks that time whole runs start `nin-train` as a fresh process (or torchrun job) and read
back its metrics.json; this is that one command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
