"""Atomic checkpoints on global rank 0; resume on every rank.

A checkpoint is a dict keyed by the module constants below; `MODEL` is the plain state_dict of the
unwrapped network (no `module.` / `_orig_mod.` prefixes), so `torch.load(path)["model"]` loads into
`NiN` directly. Rank 0 writes a temp file of its own (`last.pt.<pid>-<random>.tmp`), fsyncs it,
renames it over `last.pt` and fsyncs the folder: a process killed at any point leaves the previous
`last.pt` whole. A save that fails (disk full, quota, I/O error) removes its temp file, keeps the
previous `last.pt` and stops the run with one line (`CheckpointError`). Every rank learns how the
save went from rank 0. A resume is read by rank 0 (with `torch.load(weights_only=True)`), checked
for the keys and types below, and broadcast, so every rank starts from the same state. The trainer
never saves NaN/inf weights (see train.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import secrets
from pathlib import Path
from typing import Any

import torch

from nin_dist.distributed import DistInfo
from nin_dist.errors import CheckpointError, first_line
from nin_dist.run_dir import on_main

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
HISTORY = "history"  # the run's evaluations so far (epoch, step, val / test metrics, epoch seconds, wall clock)
EMA = "ema"  # the state_dict of the weights' moving average (train.ema_decay > 0 only)

# What a resume needs, and the type of each entry (the optional ones are checked when present).
REQUIRED = {MODEL: dict, OPTIMIZER: dict, SCALER: dict, RNG: dict, EPOCH: int, EPOCH_STEP: int, STEP: int,
            CONFIG_HASH: str}
OPTIONAL = {SCHEDULER: dict, CONFIG: dict, HISTORY: list, MLFLOW_RUN_ID: (str, type(None)),
            RUN_NAME: (str, type(None)), EMA: dict}


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


def storage_error(err: BaseException) -> str | None:
    """What the filesystem said, if `err` is a failed write: an OSError, or torch's RuntimeError over one."""
    seen: BaseException | None = err
    for _ in range(8):  # the chain of causes, not far
        if seen is None:
            break
        if isinstance(seen, OSError):
            return seen.strerror or first_line(seen)
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and "write failed" in str(err):
        return first_line(err, 160)
    return None


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` so that a crash leaves either the old file or the new one, whole.

    The temp file is this writer's own; a failed write removes it and raises CheckpointError."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        reason = storage_error(err)
        if reason is None:
            raise
        kept = "the previous checkpoint is kept" if path.exists() else "no checkpoint was written"
        raise CheckpointError(f"{path}: checkpoint not saved ({reason}); {kept}; free some space or choose "
                              f"another run.out_dir") from None


def temp_files(path: Path) -> list[Path]:
    """The temp files of writers of `path` that never finished (killed mid-write)."""
    return sorted(path.parent.glob(f"{path.name}.*.tmp"))


def check_state(state: Any, path: Path) -> dict[str, Any]:
    """`state` if it has every entry a resume reads, each of its type; else CheckpointError."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a nin-train checkpoint (a {type(state).__name__}, not a dict); "
                              f"delete it or set run.resume=false")

    def fits(value: Any, kind) -> bool:
        return isinstance(value, kind) and not (kind is int and isinstance(value, bool))

    missing = [key for key in REQUIRED if key not in state]
    wrong = [key for key, kind in {**REQUIRED, **OPTIONAL}.items() if key in state and not fits(state[key], kind)]
    if isinstance(state.get(MODEL), dict) and not all(isinstance(t, torch.Tensor) for t in state[MODEL].values()):
        wrong.append(f"{MODEL} values")
    if missing or wrong:
        found = "; ".join(f"{what}: {', '.join(keys)}" for what, keys in (("missing", missing),
                                                                          ("wrong type", wrong)) if keys)
        raise CheckpointError(f"{path}: not a nin-train checkpoint ({found}); delete it or set run.resume=false")
    return state


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer:
    """Every rank calls `save`; rank 0 writes, and every rank learns whether it worked.

    Made once the run folder is locked (see nin_dist.run_dir): rank 0 then removes the temp files a
    killed writer left, since no other job writes there."""

    def __init__(self, out_dir: Path, info: DistInfo):
        self.folder = out_dir / "checkpoints"
        self.path = self.folder / "last.pt"
        self.info = info
        if info.is_main:
            for stale in temp_files(self.path):
                with contextlib.suppress(OSError):
                    stale.unlink()

    def save(self, state: dict[str, Any]) -> None:
        on_main(self.info, lambda: atomic_save(state, self.path))

    def load_for_resume(self, config_hash: str, config: dict[str, Any], allow_change: bool) -> dict | None:
        """The last checkpoint if there is one and it belongs to this config; else None or an error.

        Rank 0 reads and checks it and sends the result to every rank, so all ranks resume from the
        same state (or raise the same error) even where only rank 0 sees `run.out_dir`.
        """
        return on_main(self.info, lambda: self._read(config_hash, config, allow_change))

    def _read(self, config_hash: str, config: dict[str, Any], allow_change: bool) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = load(self.path)
        except Exception as err:  # a checkpoint that cannot be read is the user's to remove
            raise CheckpointError(f"{self.path}: cannot be loaded ({first_line(err, 160)}); delete it or set "
                                  f"run.resume=false") from None
        check_state(state, self.path)
        if state[CONFIG_HASH] == config_hash:
            return state
        old = state.get(CONFIG, {})
        changed = ", ".join(sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))) or "unknown"
        if state[STEP] == 0:
            # The start of a run that failed in its first step (a bad lr, out of memory) holds nothing
            # trained: the fixed config starts afresh. Its own MLflow run, as MLflow keeps a run's first
            # params: continued, the old run would show the config that failed as the one that trained.
            log.warning("%s holds no step of training and was written by a different config (changed: %s): "
                        "starting afresh with this config in a new MLflow run (run %s stays as it ended)",
                        self.path, changed, state.get(MLFLOW_RUN_ID))
            return None
        if not allow_change:
            raise CheckpointError(f"{self.path} was written by a different config (changed: {changed}); use another "
                                  f"run.out_dir, run.resume=false, or run.allow_config_change=true")
        return state
