"""The Optuna study: where it is stored, how it is taken up again, and the loop of trials with pruning.

Storage: `sqlite:///<folder of the MLflow sqlite store>/optuna.db` (one file beside mlflow.db for
every study of that store), or `<sweep folder>/optuna.db` when MLflow is a server. The study keeps
as user attrs what it was made with (the search space, a hash of the other model-relevant keys, its
folder) and its parent MLflow run; taking it up with other ones is an error (one line, exit 2).

Resume. One sweep process at a time holds the sweep folder's lock, so a trial still RUNNING in the
study when a sweep starts is one a killed sweep left: it is run again *in place* (same number, same
values, same folder), and nin-train resumes its checkpoint and its MLflow run, so it is neither lost
nor doubled. Its epochs already reported stay; a trial that had written metrics.json before the kill
is told from it without running again. `--trials N` counts trials that ended (COMPLETE, PRUNED or
FAIL); a sweep stops after `MAX_FAILURES` failed trials in a row.

Pruning: Optuna's median pruner on the objective's per-epoch value (val/acc with `data.val_size`,
else test/acc), read from the trial's epochs.jsonl while it runs; a pruned trial is stopped with
SIGTERM. The last epoch is never pruned (the trial is done by then). The sampler is TPE seeded with
`--seed` plus the number of trials so far, so a resumed sweep draws new values, not the first ones again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nin_dist.errors import ConfigError
from nin_dist.sweep.parent import ParentRun
from nin_dist.sweep.progress import read_epochs, read_final
from nin_dist.sweep.space import Space
from nin_dist.sweep.trial import TrialProcess, command, wait_until_free

log = logging.getLogger(__name__)

POLL_S = 0.5  # seconds between reads of a running trial's epochs.jsonl
MAX_FAILURES = 3  # failed trials in a row that stop the sweep
STUDY_DB = "optuna.db"


def storage_url(tracking_uri: str, sweep_dir: Path) -> str:
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent}/{STUDY_DB}"
    return f"sqlite:///{Path(sweep_dir).resolve()}/{STUDY_DB}"


def open_study(name: str, storage: str, attrs: dict[str, str], seed: int, startup: int, warmup: int):
    """The study `name` (made if new, with `attrs`); ConfigError if it was made with other attrs."""
    import optuna

    study = optuna.load_study(study_name=name, storage=storage) if name in {
        s.study_name for s in optuna.get_all_study_summaries(storage)} else None
    if study is not None:
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                raise ConfigError(f"--study {name} in {storage} was made with another {key.replace('_', ' ')} "
                                  f"({study.user_attrs.get(key)!s:.200}); run it as it was made, or choose another "
                                  f"--study")
    trials = len(study.trials) if study is not None else 0
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed + trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=warmup))
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def finished(study) -> int:
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
               for t in study.get_trials(deepcopy=False))


class Sweep:
    """Runs the study's trials as nin-train jobs into `folder`, under `parent`."""

    def __init__(self, study, space: Space, parent: ParentRun, folder: Path, config: str, overrides: list[str],
                 metric: str, epochs: int, nproc: int):
        self.study, self.space, self.parent, self.folder = study, space, parent, Path(folder)
        self.config, self.overrides, self.metric, self.epochs, self.nproc = config, overrides, metric, epochs, nproc
        self.failures = 0

    def run(self, n_trials: int) -> None:
        import optuna
        from optuna.trial import TrialState

        # Left RUNNING by a killed sweep (this process holds the folder's lock): continued in place.
        # optuna.trial.Trial(study, trial_id) is how Optuna itself makes the trial of a stored id.
        for frozen in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            log.info("sweep: trial %d was interrupted; continuing it", frozen.number)
            self.run_trial(optuna.trial.Trial(self.study, frozen._trial_id), resumed=True)
        while finished(self.study) < n_trials:
            self.run_trial(self.study.ask(), resumed=False)

    def run_trial(self, trial, resumed: bool) -> None:
        from optuna.trial import TrialState

        values = {key: dist.suggest(trial, key) for key, dist in self.space.items()}  # stored ones, when resumed
        name = f"trial-{trial.number}"
        folder = self.folder / name
        shown = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                         for key, value in values.items())
        final = read_final(folder) if resumed else None  # it ended before the killed sweep could tell
        pruned_at, proc = None, None
        if final is None:
            wait_until_free(folder)
            log.info("sweep: %s: %s", name, shown)
            proc = TrialProcess(command(self.config, self.overrides, values, folder, name, self.parent.run_id,
                                        self.nproc), self.folder / f"{name}.log")
            pruned_at = self._watch(trial, proc, folder)
            final = read_final(folder) if pruned_at is None and proc.returncode == 0 else None
        else:
            self._report(trial, folder)
        run_id = (final.run_id if final else None) or trial.user_attrs.get("mlflow_run_id")
        if pruned_at is not None:
            self.study.tell(trial, state=TrialState.PRUNED)
            self.parent.child_ended(run_id, "PRUNED", pruned_at)
            log.info("sweep: %s pruned after epoch %d (%s %.4f, below the median)", name, pruned_at, self.metric,
                     trial.storage.get_trial(trial._trial_id).intermediate_values[pruned_at])
            self.failures = 0
        elif final is not None and self.metric in final.scores:
            trial.set_user_attr("scores", final.scores)
            self.study.tell(trial, final.scores[self.metric])
            self.parent.child_ended(run_id, "COMPLETE")
            log.info("sweep: %s complete: %s %.4f", name, self.metric, final.scores[self.metric])
            self.failures = 0
        else:
            self.study.tell(trial, state=TrialState.FAIL)
            self.parent.child_ended(run_id, "FAIL")
            self.failures += 1
            why = proc.last_line() if proc else "its metrics.json holds no " + self.metric
            log.error("sweep: %s failed (exit %s): %s; see %s", name, proc.returncode if proc else "-", why,
                      self.folder / f"{name}.log")
            if self.failures >= MAX_FAILURES:
                raise RuntimeError(f"{MAX_FAILURES} trials in a row failed; the last: {why}")
        if resumed:
            self.parent.retire_leftovers(name, run_id)

    def _report(self, trial, folder: Path) -> int | None:
        """Report the epochs the trial has scored since the last call; the epoch to prune at, or None."""
        epochs = read_epochs(folder, self.metric)
        if epochs.run_id and trial.user_attrs.get("mlflow_run_id") != epochs.run_id:
            trial.set_user_attr("mlflow_run_id", epochs.run_id)
            self.parent.child_started(epochs.run_id, trial.number, self.study.study_name)
        reported = trial.storage.get_trial(trial._trial_id).intermediate_values
        for epoch in sorted(set(epochs.values) - set(reported)):
            trial.report(epochs.values[epoch], epoch)
            if epoch < self.epochs and trial.should_prune():
                return epoch
        return None

    def _watch(self, trial, proc: TrialProcess, folder: Path) -> int | None:
        """Follow the running trial, reporting each epoch; stop it when pruned. The epoch pruned at, or None."""
        try:
            while True:
                alive = proc.running()
                pruned_at = self._report(trial, folder)
                if pruned_at is not None:
                    proc.stop()
                    return pruned_at
                if not alive:
                    return None
                time.sleep(POLL_S)
        except BaseException:  # the sweep is stopping (SIGTERM, Ctrl-C, a failure): the trial stops too
            if proc.running():
                proc.stop()
            raise
