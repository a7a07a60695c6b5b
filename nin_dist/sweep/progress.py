"""What a trial's run folder says about it: its scored epochs while it runs, its metrics at the end.

The trainer appends a line to `epochs.jsonl` as it scores each epoch (`nin_dist.run_dir`) and writes
`metrics.json` at the end. The sweep reads both while the trial runs, so both are read as untrusted
input: a plain file only (never through a symlink), at most `MAX_BYTES`, only whole lines (the last
may be mid-write), and from each line only an epoch number, an accuracy in [0, 1] and a run id of
MLflow's form; anything else on a line, or a line that is no JSON object, is skipped. A restart of
the trial may score an epoch again: its last line counts.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nin_dist.config import MAX_EPOCHS, RUN_ID
from nin_dist.run_dir import EPOCHS_FILE

MAX_BYTES = 4 << 20  # far above any run's epochs.jsonl or metrics.json
METRICS_FILE = "metrics.json"
FINAL_KEYS = ("val_acc", "val_loss", "test_acc", "test_loss")


def read_bytes(path: Path) -> bytes | None:
    """The file's first MAX_BYTES, or None when it is absent, a symlink, not a plain file or unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(MAX_BYTES)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _run_id(value) -> str | None:
    return value if isinstance(value, str) and RUN_ID.fullmatch(value) else None


@dataclass(frozen=True)
class Epochs:
    """A trial's scored epochs so far: epoch (1, 2, ...) -> the metric, and its MLflow run id once seen."""

    values: dict[int, float]
    run_id: str | None


def read_epochs(folder: Path, metric: str) -> Epochs:
    """The epochs of `folder/epochs.jsonl` that carry `metric` (`val_acc` or `test_acc`)."""
    data = read_bytes(Path(folder) / EPOCHS_FILE) or b""
    values, run_id = {}, None
    for line in data.split(b"\n")[:-1]:  # the part after the last newline may be a line mid-write
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(entry, dict):
            continue
        epoch, value = entry.get("epoch"), _number(entry.get(metric))
        if isinstance(epoch, int) and not isinstance(epoch, bool) and 1 <= epoch <= MAX_EPOCHS \
                and value is not None and 0.0 <= value <= 1.0:
            values[epoch] = value
        run_id = _run_id(entry.get("mlflow_run_id")) or run_id
    return Epochs(values, run_id)


@dataclass(frozen=True)
class Final:
    """A finished trial's metrics.json: the final scores present in it, and its MLflow run id."""

    scores: dict[str, float]
    run_id: str | None


def read_final(folder: Path) -> Final | None:
    """`folder/metrics.json` once the trial wrote it whole; None while there is none (or it is not one)."""
    data = read_bytes(Path(folder) / METRICS_FILE)
    try:
        metrics = json.loads(data) if data else None
    except (ValueError, RecursionError):
        return None
    if not isinstance(metrics, dict):
        return None
    scores = {key: _number(metrics.get(key)) for key in FINAL_KEYS}
    return Final({key: value for key, value in scores.items() if value is not None},
                 _run_id(metrics.get("mlflow_run_id")))
