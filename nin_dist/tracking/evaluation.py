"""The evaluation run `nin-eval` logs: one split's scores, linked to the model that was scored.

The run goes into the model's experiment (the LoggedModel's; for a checkpoint, the experiment of the
run that wrote it when this store holds that run; else `tracking.experiment`), created like a
training run (`nin_dist.tracking.run.open_run`: the config as params, versions and git commit as
tags). It holds:

- the split as a dataset input (context `evaluation`) and the model as a model input
  (`LoggedModelInput`), MLflow 3's link from an evaluation to what it evaluated;
- `SPLIT/loss`, `SPLIT/acc` and `SPLIT/class_acc/<class>` at step 0, each linked to the model
  (`model_id`) and the dataset, so they show among the LoggedModel's metrics;
- tags `nin.eval.model` (MODEL as given), `nin.eval.model_id`, `nin.eval.source_run_id`;
- the JSON report as the artifact `evaluation.json`, its secrets replaced by `***`.

A checkpoint is linked to the LoggedModel its run logged at the checkpoint's step (the same weights);
otherwise only the source run is named. Requests are synchronous and bounded (`HttpBounds`): the
command has finished its work by then, so there is nothing to spool.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from nin_dist.config import replace
from nin_dist.errors import TrackingError
from nin_dist.model_source import LOGGED_MODEL_NAME
from nin_dist.tracking.redaction import quiet_run_links, redact, redact_error, redact_uri, run_link, secret_values
from nin_dist.tracking.run import open_run
from nin_dist.tracking.store import HttpBounds, check_reachable, resolve_uri
from nin_dist.tracking.tracker import dataset_fields

log = logging.getLogger(__name__)

REPORT_ARTIFACT = "evaluation.json"  # the report's name among the run's artifacts


class NullEvaluationRun:
    """Tracking off: the same methods, nothing logged."""

    run_id: str | None = None

    def log(self, split, metrics: dict[str, float], report_path: Path) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class EvaluationRun:
    """The MLflow run of one evaluation: created at construction, filled by `log`, ended by `close`."""

    def __init__(self, cfg, info, source, name: str):
        from mlflow import MlflowClient

        self.uri, where = resolve_uri(cfg.tracking.uri)
        self._secrets = secret_values((cfg.tracking.uri, self.uri))
        quiet_run_links()  # MLflow's own line at the end quotes the URI, password included
        self._bounds = HttpBounds(cfg.tracking.timeout_s).open()
        try:
            check_reachable(self.uri, where, cfg.tracking.timeout_s)
            self._client = MlflowClient(self.uri)
            experiment, self.model_id = self._link(source, cfg.tracking.experiment)
            tags = {"nin.eval.model": source.uri, "nin.eval.model_id": self.model_id or "",
                    "nin.eval.source_run_id": source.run_id or "", "device_name": str(info.device)}
            run_cfg = replace(cfg, tracking={"experiment": experiment}, run={"name": name})
            self.run_id = open_run(self._client, run_cfg, info, None, tags, self._clean)
        except TrackingError:
            self._bounds.close()
            raise
        except Exception as err:  # MlflowException, or the store's own (SQLAlchemy, OS) errors
            self._bounds.close()
            raise TrackingError(f"MLflow tracking store {redact_uri(self.uri)}: could not start the evaluation run "
                                f"({redact_error(err, self._secrets)})") from None
        except BaseException:
            self._bounds.close()
            raise
        self._closed = False
        log.info("tracking: evaluation run %s in %s (model %s)", self.run_id, redact_uri(self.uri),
                 self.model_id or "not in this store")

    def _clean(self, value) -> str:
        return redact(str(value), self._secrets)

    def _link(self, source, fallback: str) -> tuple[str, str | None]:
        """(the experiment's name, the LoggedModel to link or None) for `source` in this store."""
        from mlflow.exceptions import MlflowException

        client = self._client
        model_id, experiment = source.model_id, source.experiment_id
        try:
            if model_id is not None:
                experiment = client.get_logged_model(model_id).experiment_id
            elif source.run_id is not None:  # a checkpoint: its run's model of the same step, if any
                run = client.get_run(source.run_id)
                experiment = run.info.experiment_id
                # the served "model", not the "network" logged beside it at the same step
                same = [o.model_id for o in (run.outputs.model_outputs if run.outputs else [])
                        if (source.step is None or o.step == source.step)
                        and client.get_logged_model(o.model_id).name == LOGGED_MODEL_NAME]
                model_id = same[-1] if same else None
        except MlflowException:  # the model or run lives in another store: name it only in the tags
            model_id, experiment = None, None
        if experiment is None:
            return fallback, None
        return client.get_experiment(experiment).name, model_id

    def log(self, split, metrics: dict[str, float], report_path: Path) -> None:
        """The split and model as inputs, the metrics linked to both, and the report file."""
        from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Metric

        fields = dataset_fields(split, self._clean)
        dataset = DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", "evaluation")])
        self._client.log_inputs(self.run_id, datasets=[dataset],
                                models=[LoggedModelInput(self.model_id)] if self.model_id else None)
        now = _now_ms()
        self._client.log_batch(self.run_id, metrics=[
            Metric(key, float(value), now, 0, model_id=self.model_id, dataset_name=fields["name"],
                   dataset_digest=fields["digest"], run_id=self.run_id) for key, value in metrics.items()])
        with tempfile.TemporaryDirectory(prefix="nin-eval-") as tmp:
            staged = Path(tmp) / REPORT_ARTIFACT
            staged.write_text(self._clean(Path(report_path).read_text(encoding="utf-8")), encoding="utf-8")
            self._client.log_artifact(self.run_id, str(staged))

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.set_terminated(self.run_id, status)
            link = run_link(self.uri, self._client.get_run(self.run_id).info.experiment_id, self.run_id)
            if link:
                log.info("tracking: view evaluation run %s at %s", self.run_id, link)
        except Exception as err:  # the results are printed and written already
            log.error("tracking: evaluation run %s not ended (%s)", self.run_id, redact_error(err, self._secrets))
        finally:
            self._bounds.close()


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def start_evaluation_run(cfg, info, source, name: str):
    """An `EvaluationRun` with `tracking.enabled`, else a `NullEvaluationRun`."""
    return EvaluationRun(cfg, info, source, name) if cfg.tracking.enabled else NullEvaluationRun()


__all__ = ["EvaluationRun", "NullEvaluationRun", "start_evaluation_run"]
