"""The one real nin-sweep the tracking tests share: 4 trials into a sqlite store, SIGKILLed with its
trial once trial 1 has opened its MLflow run, then run again to the end.

tests/tracking/test_sweep.py checks the study and the runs it left; test_mlflow_ui_browser.py serves
the same store with launch/mlflow-server.sh and reads the runs in Chromium. tests/conftest.py runs
both modules on one test worker, so the sweep is run once.

The search space is the learning rate from 1e-5 (a model that stays at chance after an epoch) to 0.1
(one that learns): with the sampler seed 8 the first trials learn and a later one does not, so the
median pruner stops it after its first epoch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import CPU_CONFIG, children, env, finish, start

SPACE = "sweep:\n  optim.lr: {type: float, low: 1.0e-5, high: 0.1, log: true}\n"
TRIALS = 4
TINY = ["data.train_limit=1024", "data.val_size=128", "data.test_limit=100", "train.epochs=2", "train.batch_size=64",
        "model.width=0.25", "optim.schedule=constant", "optim.warmup_epochs=0", "train.progress=false",
        "train.threads=1", "tracking.system_metrics=false", "tracking.log_model=false"]


@dataclass(frozen=True)
class SweepRun:
    folder: Path  # the working folder: mlflow.db and optuna.db live here, the sweep in ./sweep
    output: str  # what the second (resuming) nin-sweep printed

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder}/mlflow.db"

    @property
    def optuna_storage(self) -> str:
        return f"sqlite:///{self.folder}/optuna.db"


def config_file(folder: Path, section: str = SPACE) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(CPU_CONFIG.read_text() + section)
    return path


def sweep_cmd(folder: Path) -> list[str]:
    return [sys.executable, "-m", "nin_dist.sweep", "--config", str(config_file(folder)), "--trials", str(TRIALS),
            "--study", "lr", "--seed", "8", "--startup-trials", "1", *TINY,
            f"tracking.uri=sqlite:///{folder}/mlflow.db", f"run.out_dir={folder}/sweep"]


def kill_during_trial_1(proc, folder: Path) -> None:
    """SIGKILL the sweep and its trial's process group once trial 1 has opened its MLflow run."""
    log, deadline = folder / "trial-1.log", time.monotonic() + 300
    while not (log.exists() and "tracking: MLflow run" in log.read_text()):
        assert proc.poll() is None, finish(proc, 5)[1][-4000:]
        assert time.monotonic() < deadline, "trial 1 never started"
        time.sleep(0.2)
    trials = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in trials:
        os.killpg(pid, signal.SIGKILL)
    proc.wait()


def killed_and_resumed_sweep(folder: Path) -> SweepRun:
    cmd = sweep_cmd(folder)
    kill_during_trial_1(start(cmd, cwd=folder, env=env()), folder / "sweep")
    code, out = finish(start(cmd, cwd=folder, env=env()), 900)
    assert code == 0, out[-5000:]
    return SweepRun(folder, out)
