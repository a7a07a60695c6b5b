"""The Optuna study every worker shares, and the loop each worker runs: take a trial, train it, tell it.

The study (`open_study`) is made once, under the storage's claim lock (`nin_dist.sweep.storage`),
with user attrs saying what it was made with (the search space, a hash of the other model-relevant
keys, its folder) and its parent MLflow run; taking it up with other ones is an error (exit 2).

A worker (`Worker.run`), one of `--workers` threads of each nin-sweep process on any machine:

1. Under the claim lock, takes a trial: a RUNNING one whose owner's heartbeat is stale (its worker
   died: SIGKILL, OOM, a lost machine), else a new one while the study holds fewer than `--trials`.
   Trial numbers are dense and only made under the lock, so the study ends with exactly `--trials`
   trials (COMPLETE, PRUNED or FAIL), never more, whatever the workers.
2. Runs it as a nin-train job (`nin_dist.sweep.trial`) into `<sweep>/trial-N`, beating its heartbeat.
   A taken-over trial is run again *in place* (same number, values and folder): nin-train resumes
   its checkpoint and its MLflow run, so it is neither lost nor trained twice to the end; a trial
   that had written metrics.json before its worker died is told from it without running again, and
   one whose scored epochs already put it below the median is pruned without running again.
   A worker that finds its trial taken over (its machine came back after the grace period) stops
   its copy at once (SIGKILL: its checkpoint and MLflow run now belong to the new owner).
3. Tells the study; when nothing is left to take, waits for the trials of the other workers (any
   of which may die and be taken over) and then ends: whichever worker sees the last trial ended
   writes the best trial on the parent run and ends it FINISHED.

Sampling: TPE with constant liar (a running trial counts as a bad one, so parallel workers do not
draw the same values), seeded with `--seed` plus the trial's number: reproducible, and different
for every worker. Pruning: Optuna's median pruner over every worker's trials, on the objective's
per-epoch value (val/acc with `data.val_size`, else test/acc) read from the trial's epochs.jsonl;
a pruned trial is stopped with SIGTERM. The last epoch is never pruned. A worker stops after
`MAX_FAILURES` failed trials in a row.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from nin_dist.errors import ConfigError
from nin_dist.sweep.parent import ParentRun
from nin_dist.sweep.progress import read_epochs, read_final
from nin_dist.sweep.space import Space
from nin_dist.sweep.storage import OWNER, Storage, StorageError, owner_of
from nin_dist.sweep.trial import TrialProcess, command, wait_until_free

log = logging.getLogger(__name__)

POLL_S = 0.5  # seconds between reads of a running trial's epochs.jsonl
WAIT_S = 1.0  # seconds between looks at the study when every trial is taken
MAX_FAILURES = 3  # failed trials in a row that stop a worker


class TakenOver(Exception):
    """This worker's trial was taken over by another worker (this one missed its heartbeats)."""


def open_study(storage: Storage, name: str, attrs: dict[str, str], workers: int):
    """The study `name` (made if new, with `attrs`); ConfigError if it was made with other attrs."""
    import optuna

    storage.open()
    with storage.claim(name):
        if name in {s.study_name for s in optuna.get_all_study_summaries(storage.optuna)}:
            study = optuna.load_study(study_name=name, storage=storage.optuna)
            for key, value in attrs.items():
                if study.user_attrs.get(key) != value:
                    raise ConfigError(f"--study {name} in {storage.shown} was made with another "
                                      f"{key.replace('_', ' ')} ({study.user_attrs.get(key)!s:.200}); run it as it "
                                      f"was made, or choose another --study")
        else:
            study = optuna.create_study(study_name=name, storage=storage.optuna, direction="maximize")
            for key, value in attrs.items():
                study.set_user_attr(key, value)
        if storage.kind == "sqlite":
            _alone_on_sqlite(study, storage, workers)
    return study


def _alone_on_sqlite(study, storage: Storage, workers: int) -> None:
    """sqlite answers "database is locked" to concurrent writers: one worker at a time, on one machine."""
    from optuna.trial import TrialState

    storage.check_workers(workers)
    here = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host = (owner_of(trial) or "").partition(":")[0]
        if host and host != here:
            raise StorageError(f"the sqlite study {storage.shown} has trial {trial.number} running on host {host}: "
                               f"workers on several machines need --storage postgresql://")


def finished(study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


@dataclass
class Plan:
    """What every worker of this process shares."""

    storage: Storage
    name: str
    space: Space
    parent: ParentRun
    folder: Path
    config: str
    overrides: list[str]
    metric: str
    epochs: float
    nproc: int
    trials: int
    seed: int
    startup: int
    warmup: int
    heartbeat_s: float
    grace_s: float
    register: str | None
    env: dict[str, str]  # for every trial: the tracking URI (a secret stays out of argv)
    stop: threading.Event = field(default_factory=threading.Event)  # set when the process stops

    @property
    def process(self) -> str:
        """The owner prefix of this process's workers: host:pid."""
        return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """One worker: takes and runs trials of the study until every trial has ended."""

    def __init__(self, plan: Plan, index: int, env: dict[str, str], overrides: list[str]):
        import optuna

        self.plan, self.index, self.env, self.overrides = plan, index, env, overrides
        self.owner = f"{plan.process}:{index}"
        self.failures = 0
        self.study = optuna.load_study(study_name=plan.name, storage=plan.storage.optuna, pruner=(
            optuna.pruners.MedianPruner(n_startup_trials=plan.startup, n_warmup_steps=plan.warmup)))

    def run(self) -> None:
        plan = self.plan
        while not plan.stop.is_set():
            with plan.storage.claim(plan.name):
                trials = self.study.get_trials(deepcopy=False)
                trial, resumed = self._take(trials)
                done = trial is None and len(trials) >= plan.trials and all(t.state.is_finished() for t in trials)
            if trial is not None:
                try:
                    self.run_trial(trial, resumed)
                except TakenOver:
                    log.warning("sweep: trial %d was taken over by another worker (this one missed its heartbeats "
                                "for %g s); stopped here", trial.number, plan.grace_s)
                continue
            if done:
                self.finish()
                return
            plan.stop.wait(WAIT_S)

    def _take(self, trials):
        """(trial, taken over?) under the claim lock, or (None, False) when none is free."""
        import optuna
        from optuna.trial import TrialState

        plan = self.plan
        for frozen in trials:
            if frozen.state != TrialState.RUNNING or (owner_of(frozen) or "").startswith(plan.process + ":"):
                continue
            if plan.storage.stale(frozen, plan.grace_s):
                log.info("sweep: trial %d of worker %s has no heartbeat for %g s; taking it over", frozen.number,
                         owner_of(frozen) or "(a sweep before heartbeats)", plan.grace_s)
                plan.storage.beat(frozen._trial_id, self.owner)
                # optuna.trial.Trial(study, trial_id) is how Optuna itself makes the trial of a stored id.
                return optuna.trial.Trial(self.study, frozen._trial_id), True
        if len(trials) >= plan.trials:
            return None, False
        self.study.sampler = optuna.samplers.TPESampler(seed=plan.seed + len(trials), constant_liar=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant_liar is experimental in some Optuna versions
            trial = self.study.ask()
        plan.storage.beat(trial._trial_id, self.owner)
        return trial, False

    def run_trial(self, trial, resumed: bool) -> None:
        from optuna.trial import TrialState

        plan = self.plan
        values = {key: dist.suggest(trial, key) for key, dist in plan.space.items()}  # stored ones, when resumed
        name = f"trial-{trial.number}"
        folder = plan.folder / name
        shown = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in values.items())
        final = read_final(folder) if resumed else None  # it ended before its worker could tell
        pruned_at, proc = None, None
        if final is None and resumed:  # the epochs it scored before its worker died may already prune it
            pruned_at = self._report(trial, folder) or self._prunes_now(trial)
        if final is None and pruned_at is None:
            wait_until_free(folder)
            log.info("sweep: %s%s: %s", name, f" (worker {self.index})" if self.index else "", shown)
            proc = TrialProcess(command(plan.config, self.overrides, values, folder, name, plan.parent.run_id,
                                        plan.nproc), plan.folder / f"{name}.log", plan.env | self.env)
            pruned_at = self._watch(trial, proc, folder)
            final = read_final(folder) if pruned_at is None and proc.returncode == 0 else None
        elif final is not None:
            self._report(trial, folder)
        run_id = (final.run_id if final else None) or trial.user_attrs.get("mlflow_run_id")
        if pruned_at is not None:
            self.study.tell(trial, state=TrialState.PRUNED)
            plan.parent.child_ended(run_id, "PRUNED", pruned_at)
            log.info("sweep: %s pruned after epoch %d (%s %.4f, below the median)", name, pruned_at, plan.metric,
                     trial.storage.get_trial(trial._trial_id).intermediate_values[pruned_at])
            self.failures = 0
        elif final is not None and plan.metric in final.scores:
            trial.set_user_attr("scores", final.scores)
            self.study.tell(trial, final.scores[plan.metric])
            plan.parent.child_ended(run_id, "COMPLETE")
            log.info("sweep: %s complete: %s %.4f", name, plan.metric, final.scores[plan.metric])
            self.failures = 0
            if plan.register:
                with plan.storage.claim(plan.name):  # the alias follows the study's best, one worker at a time
                    self._alias_best()
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            plan.parent.child_ended(run_id, "FAIL")
            self.failures += 1
            why = proc.last_line() if proc else "its metrics.json holds no " + plan.metric
            log.error("sweep: %s failed (exit %s): %s; see %s", name, proc.returncode if proc else "-", why,
                      plan.folder / f"{name}.log")
            if self.failures >= MAX_FAILURES:
                raise RuntimeError(f"{MAX_FAILURES} trials in a row failed; the last: {why}")
        if resumed:
            plan.parent.retire_leftovers(name, run_id)

    def _report(self, trial, folder: Path) -> int | None:
        """Report the epochs the trial has scored since the last call; the epoch to prune at, or None."""
        epochs = read_epochs(folder, self.plan.metric)
        if epochs.run_id and trial.user_attrs.get("mlflow_run_id") != epochs.run_id:
            trial.set_user_attr("mlflow_run_id", epochs.run_id)
            self.plan.parent.child_started(epochs.run_id, trial.number, self.plan.name)
        reported = trial.storage.get_trial(trial._trial_id).intermediate_values
        for epoch in sorted(set(epochs.values) - set(reported)):
            trial.report(epochs.values[epoch], epoch)
            if epoch < self.plan.epochs and trial.should_prune():
                return epoch
        return None

    def _prunes_now(self, trial) -> int | None:
        """The trial's last reported epoch when the pruner stops it there now (the other trials have moved
        the median since it was reported), else None; the last epoch is never pruned."""
        reported = trial.storage.get_trial(trial._trial_id).intermediate_values
        last = max(reported, default=None)
        return last if last is not None and last < self.plan.epochs and trial.should_prune() else None

    def _beat(self, trial) -> None:
        """The trial's heartbeat; TakenOver when another worker owns it now. Also a look at the other
        running trials' beats: staleness is timed from when this process saw a beat change, so a busy
        worker that looks is ready to take a dead worker's trial over as soon as it is free."""
        from optuna.trial import TrialState

        storage = self.plan.storage
        if storage.optuna.get_trial_system_attrs(trial._trial_id).get(OWNER) != self.owner:
            raise TakenOver
        storage.beat(trial._trial_id)
        for other in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.stale(other, self.plan.grace_s)

    def _watch(self, trial, proc: TrialProcess, folder: Path) -> int | None:
        """Follow the running trial, reporting each epoch and beating; stop it when pruned. The epoch
        pruned at, or None."""
        next_beat = time.monotonic() + self.plan.heartbeat_s
        try:
            while True:
                alive = proc.running()
                if time.monotonic() >= next_beat:
                    self._beat(trial)
                    next_beat = time.monotonic() + self.plan.heartbeat_s
                pruned_at = self._report(trial, folder)
                if pruned_at is not None:
                    proc.stop()
                    return pruned_at
                if not alive:
                    return None
                if self.plan.stop.wait(POLL_S):
                    raise SystemExit(143)  # the process is stopping: this trial stops, its state stays RUNNING
        except TakenOver:
            proc.kill()
            raise
        except BaseException:  # the sweep is stopping (SIGTERM, Ctrl-C, a failure): the trial stops too
            if proc.running():
                proc.stop()
            raise

    def _alias_best(self) -> None:
        best = self.study.best_trial
        if best.user_attrs.get("mlflow_run_id"):
            self.plan.parent.alias_best(self.plan.register, best.user_attrs["mlflow_run_id"])

    def finish(self) -> None:
        """The best trial on the parent run, its model version @best, the parent FINISHED: once, by the first
        worker that sees every trial ended (the others find the parent FINISHED)."""
        plan = self.plan
        with plan.storage.claim(plan.name):
            if plan.parent.status() == "FINISHED":
                return
            try:
                best = self.study.best_trial
            except ValueError:
                log.warning("sweep: no trial completed; the parent run holds no best trial")
            else:
                run_id = best.user_attrs.get("mlflow_run_id")
                plan.parent.log_best(best.number, best.params, run_id, best.user_attrs.get("scores", {}),
                                     finished(self.study))
                uri = plan.parent.alias_best(plan.register, run_id) if plan.register else None
                log.info("sweep: best trial %d: %s %.4f (%s)%s", best.number, plan.metric.replace("_", "/"),
                         best.value, ", ".join(f"{k}={v}" for k, v in best.params.items()), f"; {uri}" if uri else "")
            plan.parent.end("FINISHED")
