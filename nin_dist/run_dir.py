"""The run's folder: a name and place every rank agrees on, and the files rank 0 writes there.

`make_run_dir` returns a `RunDir` on global rank 0 and a `NullRunDir` with the same methods on the
other ranks, so the trainer never tests the rank: every rank asks for `config.yaml` and
`metrics.json` to be written, and only rank 0 writes them. Checkpoints (`checkpoints/`, see
`nin_dist.checkpoint`) and the tracking spool (`tracking-spool/`) live in the same folder.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from nin_dist import distributed
from nin_dist.config import Config, replace
from nin_dist.distributed import DistInfo


def resolve_run(cfg: Config) -> Config:
    """Give the run a name and folder that every rank agrees on and a torchrun restart finds again."""
    name = cfg.run.name
    if name is None:
        elastic_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = distributed.broadcast_object(f"nin-{elastic_id[:12]}" if elastic_id != "none" else f"nin-{stamp}")
    out_dir = cfg.run.out_dir or str(Path("runs") / name)
    return replace(cfg, run={"name": name, "out_dir": out_dir})


class RunDir:
    """`run.out_dir` on rank 0: made at the start, each file written whole (temp file, then rename)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def write_text(self, name: str, text: str) -> Path:
        """Write `name` in the folder; returns its path."""
        target = self.path / name
        tmp = target.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
        return target

    def write_json(self, name: str, obj: dict) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2) + "\n")


class NullRunDir(RunDir):
    """The same folder seen from ranks > 0: nothing is made or written, paths are still answered."""

    def create(self) -> None: ...

    def write_text(self, name: str, text: str) -> Path:
        return self.path / name


def make_run_dir(path: Path, info: DistInfo) -> RunDir:
    return RunDir(path) if info.is_main else NullRunDir(path)
