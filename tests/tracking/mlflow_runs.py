"""Small tracked runs for the tests, and reading them back from MLflow with MlflowClient.

The tracker is driven directly (no trainer) with a tiny NiN and the first images of the real
Fashion-MNIST; `config` makes the run's config, `step_metrics` what one step logs.
"""

from __future__ import annotations

import time

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient

from nin_dist.config import Config, DataConfig, ModelConfig, RunConfig, TrackingConfig
from nin_dist.distributed import DistInfo

INFO = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)
TINY = ModelConfig(width=0.1, stem_kernel=3, stem_stride=1, stem_padding=1)
TRAINER_TAGS = {"kernel": "torch", "device_name": "cpu"}
PREDICTION_FILES = {"confusion_matrix.png", "confusion_matrix.csv", "per_class_accuracy.csv",
                    "per_class_accuracy.json", "misclassified.png"}


def config(uri: str, name: str, **tracking) -> Config:
    tracking = {"experiment": "nin-tests", "system_metrics": False, "timeout_s": 3.0} | tracking
    return Config(data=DataConfig(resize=28), model=TINY, tracking=TrackingConfig(uri=uri, **tracking),
                  run=RunConfig(name=name))


def step_metrics(step: int) -> dict[str, float]:
    metrics = {"train/loss": 2.0 / step, "train/lr": 0.01 * step}
    if step % 3 == 0:
        metrics |= {"test/acc": step / 100, "perf/img_per_s": 1000.0 + step}
    return metrics


def history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = [k for k in client.get_run(run_id).data.metrics if not k.startswith("system/")]
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def run_models(client: MlflowClient, run) -> dict[str, str]:
    """The LoggedModels the run logged, by name: its served "model" and its plain "network"."""
    models = {client.get_logged_model(o.model_id).name: o.model_id for o in run.outputs.model_outputs}
    assert len(models) == len(run.outputs.model_outputs) == 2, models
    return models


def logged_model(uri: str, run_id: str):
    """The run's plain network (an MLflow LoggedModel beside its served model), loaded back with mlflow.pytorch."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    return mlflow.pytorch.load_model(f"models:/{run_models(client, client.get_run(run_id))['network']}")


def wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting: {what}")
