"""The run's model: saved into the spool as an MLflow pytorch model, then logged from its files.

`save_model` writes the model with `mlflow.pytorch.save_model` in MLflow's graph format
(`serialization_format="pt2"`, `torch.export`), its weights in the default memory format, with the
signature of example -> output and the example as input example, pinning its requirements
(`model_requirements`).

`log_saved_model` makes that folder the run's model, an MLflow LoggedModel, as
`mlflow.pytorch.log_model` would: a LoggedModel in the run's experiment with the run's params and
MLflow's context tags; the folder's files as its artifacts, its MLmodel rewritten to name the
LoggedModel and the run; the run's model output at `step`; the run's metrics of that step linked
to it; status READY (FAILED if a request fails midway). It never loads the model: the folder may
come from a run folder on shared storage, and loading an MLflow pytorch model unpickles it, which
can run any code. The files go as they are; `mlflow.pytorch.load_model("models:/<model_id>")` then
loads the model as one logged live, with MLflow's own checks for whoever loads it.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

from nin_dist.tracking.mlflow_internals import context_tags
from nin_dist.tracking.store import MAX_BATCH_METRICS

MLMODEL = "MLmodel"  # the model's description in its folder (YAML)


def model_requirements() -> list[str]:
    """Pinned pip requirements of the logged model (given, so MLflow does not probe imports)."""
    import mlflow.pytorch

    return mlflow.pytorch.get_default_pip_requirements()


def save_model(model, example, path: Path) -> None:
    """Save `model` (which must run on the CPU as it is) as an MLflow pytorch model at `path`."""
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = _in_default_layout(model)
    x = example.detach().cpu().float()
    with torch.no_grad():
        y = model(x)
    mlflow.pytorch.save_model(model, str(path), signature=infer_signature(x.numpy(), y.numpy()),
                              input_example=x.numpy(), pip_requirements=model_requirements(),
                              serialization_format="pt2")


def _in_default_layout(model):
    """A copy of `model` whose weights are in the default (contiguous) memory format.

    torch.export's weight packing looks for a contiguous tensor covering its whole storage, and warns
    ("No complete tensor found in the group!") for a weight that is not one, as the k x k conv
    weights of a channels_last model (`train.channels_last`) are not. The saved model is for
    inference on any machine: its weights go in the default layout; the caller's model keeps its own.
    """
    import torch

    return copy.deepcopy(model).to(memory_format=torch.contiguous_format)


def read_saved_model(folder: Path):
    """The folder's MLmodel as an `mlflow.models.Model` (YAML read with `safe_load`; nothing loaded)."""
    import yaml
    from mlflow.models import Model

    with open(folder / MLMODEL, encoding="utf-8") as f:
        return Model.from_dict(yaml.safe_load(f))


def log_saved_model(client, run_id: str, folder: Path, saved, name: str, step: int) -> None:
    """Log the model saved in `folder` (its MLmodel read as `saved`) as the run's model `name`."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                        params=dict(run.data.params), tags=context_tags({}))
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        _link_step_metrics(client, run_id, logged.model_id, step)
        saved.artifact_path, saved.run_id = logged.artifact_location, run_id
        saved.model_uuid = saved.model_id = logged.model_id
        with tempfile.TemporaryDirectory(prefix="nin-model-") as tmp:
            files = Path(tmp) / "model"
            shutil.copytree(folder, files)  # the spool's folder stays as it was, for a resend
            saved.save(str(files / MLMODEL))
            client.log_model_artifacts(logged.model_id, str(files))
    except BaseException:
        try:
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        except Exception:  # the store is away: the model stays PENDING, and a resend logs a new one
            pass
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _link_step_metrics(client, run_id: str, model_id: str, step: int) -> None:
    """The run's metrics at `step`, linked to the model (what `mlflow.pytorch.log_model` does)."""
    from mlflow.entities import Metric

    metrics = [Metric(m.key, m.value, m.timestamp, m.step, model_id=model_id, dataset_name=m.dataset_name,
                      dataset_digest=m.dataset_digest, run_id=run_id)
               for key in client.get_run(run_id).data.metrics
               for m in client.get_metric_history(run_id, key) if m.step == step and m.model_id is None]
    for lo in range(0, len(metrics), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=metrics[lo: lo + MAX_BATCH_METRICS])
