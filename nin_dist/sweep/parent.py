"""The sweep's MLflow side: the parent run, the state of each child run, the best trial, the @best alias.

The parent run is made once per study (its id kept as the study's user attr) and taken up again
when a killed sweep runs again. Each trial's own nin-train run nests under it (`mlflow.parentRunId`,
set by the trainer from `tracking.parent_run_id`); the sweep tags it `sweep.trial`, `sweep.study`
and, when it ends, `sweep.state` = COMPLETE | PRUNED | FAIL (a pruned run is also KILLED, with
`sweep.pruned_at_epoch`). At the end the parent gets the best trial's values as params
`best.<key>` (and `best.trial`, `best.run_id`; MLflow params never change, so a study extended
later keeps the first ones there, and the tag `sweep.best_trial` follows the best) and its final
scores as metrics `best/val_acc`, `best/test_acc`, ... at step = trials finished.

These are the sweep process's own calls, straight to the store (the trainer's go through its spool).
"""

from __future__ import annotations

import logging
import time

from nin_dist.tracking.mlflow_internals import context_tags
from nin_dist.tracking.redaction import redact_error
from nin_dist.tracking.registry import versions_of_run
from nin_dist.tracking.run import PARENT_TAG, experiment_id, reopen

log = logging.getLogger(__name__)

BEST_ALIAS = "best"
MAX_TAG = 5000  # characters of a tag value (MLflow's limit is 8000)


class ParentRun:
    def __init__(self, client, run_id: str):
        self.client, self.run_id = client, run_id

    @classmethod
    def open(cls, client, experiment: str, name: str, run_id: str | None, tags: dict[str, str]) -> ParentRun:
        """The study's parent run `run_id` again (status back to RUNNING), or a new one."""
        if run_id:
            reopen(client, run_id, f"the study's parent MLflow run {run_id}", "use another --study",
                   "restore it or use another --study")
        else:
            run = client.create_run(experiment_id(client, experiment), run_name=name, tags=context_tags({}))
            run_id = run.info.run_id
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value)[:MAX_TAG])
        return cls(client, run_id)

    def _tags(self, run_id: str | None, tags: dict) -> None:
        """Tags on a child run; a failure is a warning (the study holds the trial's state either way)."""
        if not run_id:
            return
        try:
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value))
        except Exception as err:
            log.warning("sweep: could not tag MLflow run %s (%s)", run_id, redact_error(err, ()))

    def child_started(self, run_id: str, number: int, study: str) -> None:
        self._tags(run_id, {"sweep.trial": number, "sweep.study": study})

    def child_ended(self, run_id: str | None, state: str, pruned_at: int | None = None) -> None:
        """`sweep.state` on the child; a pruned child also ends KILLED (whatever its SIGTERM left)."""
        self._tags(run_id, {"sweep.state": state} | ({"sweep.pruned_at_epoch": pruned_at} if pruned_at else {}))
        if run_id and state == "PRUNED":
            try:
                if self.client.get_run(run_id).info.status != "KILLED":
                    self.client.set_terminated(run_id, "KILLED")
            except Exception as err:
                log.warning("sweep: could not end MLflow run %s as KILLED (%s)", run_id, redact_error(err, ()))

    def retire_leftovers(self, name: str, keep: str | None) -> None:
        """Child runs named `name` other than `keep`: a killed attempt of the trial that never reached a
        checkpoint (so its new attempt made a new run). Ended KILLED, tagged SUPERSEDED and deleted (MLflow
        keeps deleted runs until a gc; `mlflow runs restore` brings one back)."""
        run = self.client.get_run(self.run_id)
        children = self.client.search_runs(
            [run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{self.run_id}' and attributes.run_name = '{name}'")
        for child in children:
            if child.info.run_id != keep:
                log.info("sweep: MLflow run %s of an interrupted attempt of %s is superseded; deleting it",
                         child.info.run_id, name)
                self.client.set_tag(child.info.run_id, "sweep.state", "SUPERSEDED")
                self.client.set_terminated(child.info.run_id, "KILLED")
                self.client.delete_run(child.info.run_id)

    def log_best(self, number: int, values: dict, child_run_id: str | None, scores: dict, finished: int) -> None:
        """The best trial's values and scores on the parent (see the module doc)."""
        from mlflow.entities import Metric, Param

        held = self.client.get_run(self.run_id).data.params
        params = {f"best.{key}": str(value) for key, value in values.items()} | {"best.trial": str(number)}
        if child_run_id:
            params["best.run_id"] = child_run_id
        new = [Param(key, value) for key, value in params.items() if key not in held]
        stale = sorted(key for key, value in params.items() if key in held and held[key] != value)
        if stale:
            log.warning("sweep: the parent run keeps its first %s (MLflow params never change); the best is now "
                        "trial %d (tag sweep.best_trial, metrics best/*)", ", ".join(stale), number)
        now = int(time.time() * 1000)
        metrics = [Metric(f"best/{key.replace('_', '/', 1)}", value, now, finished) for key, value in scores.items()]
        self.client.log_batch(self.run_id, params=new, metrics=metrics)
        self.client.set_tag(self.run_id, "sweep.best_trial", str(number))

    def alias_best(self, model_name: str, child_run_id: str | None) -> str | None:
        """Alias `best` of registered model `model_name` on the best trial's version; its URI, or None."""
        versions = versions_of_run(self.client, model_name, child_run_id) if child_run_id else []
        if not versions:
            log.warning("sweep: the best trial's run %s has no version of registered model %r (still in its "
                        "tracking spool?); alias %r not set", child_run_id, model_name, BEST_ALIAS)
            return None
        self.client.set_registered_model_alias(model_name, BEST_ALIAS, versions[0].version)
        self.client.set_tag(self.run_id, "sweep.best_model", f"models:/{model_name}/{versions[0].version}")
        return f"models:/{model_name}@{BEST_ALIAS}"

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def end(self, status: str) -> None:
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as err:
            log.warning("sweep: could not end the parent run %s as %s (%s)", self.run_id, status,
                        redact_error(err, ()))
