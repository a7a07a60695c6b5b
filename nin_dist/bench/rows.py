"""Results as JSON lines, one row per finished measurement, so a step killed mid-way keeps its rows.

Each row is appended and flushed (and fsynced) as soon as it is measured: a timeout, a SIGKILL of the
step's process group or of the whole visit loses at most the row being measured. `read_rows` skips
a last line cut short by such a kill.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class RowWriter:
    """Append rows to a .jsonl file; every row reaches the disk before `write` returns."""

    def __init__(self, path: str | Path, **common):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.common = common  # fields every row carries (the step, the device ...)
        self.count = 0

    def write(self, **row) -> dict:
        row = {**self.common, **row}
        line = json.dumps(row, default=str) + "\n"
        with open(self.path, "a") as f:  # opened per row: nothing is buffered across rows
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.count += 1
        return row


def read_rows(path: str | Path) -> list[dict]:
    """The complete rows of a .jsonl file (none if it is missing; a torn last line is left out)."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
