"""Atomic checkpoints on global rank 0; resume on every rank.

A checkpoint is a dict keyed by the module constants below; `MODEL` is the plain state_dict of the
unwrapped network (no `module.` / `_orig_mod.` prefixes), so `torch.load(path)["model"]` loads into
`NiN` directly. Rank 0 writes `last.pt.tmp`, fsyncs it, renames it over `last.pt` and fsyncs the
folder: a process killed at any point leaves the previous `last.pt` whole. Every rank then meets at
one barrier. A resume is read by rank 0 (with `torch.load(weights_only=True)`) and broadcast, so
every rank starts from the same state. The trainer never saves NaN/inf weights (see train.py).
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import torch

from nin_dist import distributed
from nin_dist.distributed import DistInfo
from nin_dist.errors import CheckpointError, first_line

log = logging.getLogger(__name__)

MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
RNG = "rng"
EPOCH = "epoch"  # the epoch in progress (or the next one, at an epoch end)
STEP = "step"  # optimizer steps done in total
EPOCH_STEP = "epoch_step"  # optimizer steps done within EPOCH
CONFIG_HASH = "config_hash"
CONFIG = "config"  # the model-relevant keys, to say which differ on a refused resume
MLFLOW_RUN_ID = "mlflow_run_id"
RUN_NAME = "run_name"
HISTORY = "history"  # the run's evaluations so far (epoch, step, test metrics, wall clock)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` so that a crash leaves either the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """Every rank calls `save`; rank 0 writes, all meet at one barrier."""

    def __init__(self, out_dir: Path, info: DistInfo):
        self.folder = out_dir / "checkpoints"
        self.path = self.folder / "last.pt"
        self.info = info

    def save(self, state: dict[str, Any]) -> None:
        if self.info.is_main:
            atomic_save(state, self.path)
        distributed.barrier()

    def load_for_resume(self, config_hash: str, config: dict[str, Any], allow_change: bool) -> dict | None:
        """The last checkpoint if there is one and it belongs to this config; else None or an error.

        Rank 0 reads and checks it and sends the result to every rank, so all ranks resume from the
        same state (or raise the same error) even where only rank 0 sees `run.out_dir`.
        """
        result: dict | CheckpointError | None = None
        if self.info.is_main:
            try:
                result = self._read(config_hash, config, allow_change)
            except CheckpointError as err:
                result = err
        result = distributed.broadcast_object(result)
        if isinstance(result, CheckpointError):
            raise result
        return result

    def _read(self, config_hash: str, config: dict[str, Any], allow_change: bool) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = load(self.path)
        except Exception as err:  # a checkpoint that cannot be read is the user's to remove
            raise CheckpointError(f"{self.path}: cannot be loaded ({first_line(err, 160)}); delete it or set "
                                  f"run.resume=false") from None
        if state.get(CONFIG_HASH) != config_hash and not allow_change:
            old = state.get(CONFIG, {})
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise CheckpointError(
                f"{self.path} was written by a different config (changed: {', '.join(changed) or 'unknown'}); "
                f"use another run.out_dir, run.resume=false, or run.allow_config_change=true")
        return state
