"""The one real nin-sweep the tracking tests share: two worker processes on one study of 4 tiny trials,
A with `--workers 2` and B with one, into a sqlite MLflow store and the default journal storage. B is
SIGKILLed with its trial once that trial has scored its first epoch (so it has a checkpoint past
step 0); A takes B's trial over after the grace period and ends the study.

tests/tracking/test_sweep.py checks the study and the runs it left; test_mlflow_ui_browser.py serves
the same store with launch/mlflow-server.sh and reads the runs in Chromium. tests/conftest.py runs
both modules on one test worker, so the sweep is run once.

The search space is the learning rate from 1e-5 (a model that stays at chance after an epoch) to 0.1
(one that learns): with the sampler seed 1535 (each trial seeded with it plus its number) trials 0-2
learn and trial 3 does not, so the median pruner stops it after its first epoch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from helpers import CPU_CONFIG, children, env, finish, start

SPACE = "sweep:\n  optim.lr: {type: float, low: 1.0e-5, high: 0.1, log: true}\n"
TRIALS = 4
GRACE_S = 4  # seconds without a heartbeat before A takes B's trial over (the heartbeat: every second)
FINAL_STEP = 2 * ((1024 - 128) // 64)  # TINY's last step: 2 epochs of its training images at batch 64
TINY = ["data.train_limit=1024", "data.val_size=128", "data.test_limit=100", "train.epochs=2", "train.batch_size=64",
        "model.width=0.25", "optim.schedule=constant", "optim.warmup_epochs=0", "train.progress=false",
        "train.threads=1", "tracking.system_metrics=false", "tracking.log_model=false"]


@dataclass(frozen=True)
class SweepRun:
    folder: Path  # the working folder: mlflow.db here, the sweep (and its optuna.journal) in ./sweep
    output: str  # what worker A printed
    taken_over: int  # the number of B's trial, which A took over
    step_at_kill: int  # the step of that trial's newest checkpoint when B was killed
    killed_at: float  # time.time() when B was killed

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.folder}/mlflow.db"

    def study(self):
        return load_study(self.folder / "sweep")


def load_study(sweep: Path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    return optuna.load_study(study_name="lr", storage=storage)


def config_file(folder: Path, section: str = SPACE) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(CPU_CONFIG.read_text() + section)
    return path


def sweep_cmd(folder: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "nin_dist.sweep", "--config", str(config_file(folder)), "--trials", str(TRIALS),
            "--study", "lr", "--seed", "1535", "--startup-trials", "1", "--workers", str(workers), "--heartbeat", "1",
            "--grace", str(GRACE_S), *TINY, f"tracking.uri=sqlite:///{folder}/mlflow.db", f"run.out_dir={folder}/sweep"]


def _trial_of(pid: int, sweep: Path) -> tuple[int, int] | None:
    """(number, checkpoint step) of the RUNNING trial of process `pid` once it has a checkpoint past step 0."""
    from optuna.trial import TrialState

    try:
        study = load_study(sweep)
    except (KeyError, FileNotFoundError):  # not made yet
        return None
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        last = sweep / f"trial-{trial.number}" / "checkpoints" / "last.pt"
        if f":{pid}:" in trial.system_attrs.get("nin.worker", "") and (sweep / f"trial-{trial.number}" /
                                                                       "epochs.jsonl").exists() and last.exists():
            step = int(torch.load(last, weights_only=True)["step"])
            if 0 < step < FINAL_STEP:  # mid-trial; a trial whose last step is done is left to end (it may be
                return trial.number, step  # told from its metrics.json, not resumed): B takes another
    return None


def kill_after_first_epoch(proc, sweep: Path, others) -> tuple[int, int]:
    """SIGKILL worker `proc` and its trial's process group once its trial has scored an epoch:
    (the trial's number, the step of its newest checkpoint then)."""
    deadline = time.monotonic() + 300
    while (found := _trial_of(proc.pid, sweep)) is None:
        for p in (proc, *others):
            assert p.poll() is None, finish(p, 5)[1][-4000:]
        assert time.monotonic() < deadline, "worker B never scored an epoch"
        time.sleep(0.2)
    trials = children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    for pid in trials:
        os.killpg(pid, signal.SIGKILL)
    proc.wait()
    number = found[0]
    return number, int(torch.load(sweep / f"trial-{number}" / "checkpoints" / "last.pt", weights_only=True)["step"])


def two_workers_one_killed(folder: Path) -> SweepRun:
    work = folder / "work"  # not the store's folder: a trial that lost the tracking URI would miss it
    work.mkdir()
    a = start(sweep_cmd(folder, 2), cwd=work, env=env())
    b = start(sweep_cmd(folder, 1), cwd=work, env=env())
    try:
        number, step = kill_after_first_epoch(b, folder / "sweep", [a])
        killed_at = time.time()
        code, out = finish(a, 900)
    finally:  # a failed check leaves no worker behind (each is a session of its own, with its trials)
        for proc in (a, b):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert code == 0, out[-5000:]
    return SweepRun(folder, out, number, step, killed_at)
