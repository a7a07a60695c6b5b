"""The MLflow tracker against a real sqlite store: which tracker, a whole run, a resumed run.

Everything is read back with MlflowClient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from mlflow_runs import (
    INFO,
    PREDICTION_FILES,
    TINY,
    TRAINER_TAGS,
    artifact_paths,
    config,
    history,
    logged_model,
    step_metrics,
)

from nin_dist.config import Config, RunConfig, TrainConfig, flatten
from nin_dist.data import to_inputs
from nin_dist.errors import TrackingError
from nin_dist.model import NiN
from nin_dist.tracking import make_tracker
from nin_dist.tracking.run import git_commit
from nin_dist.tracking.spool import SPOOL_DIR
from nin_dist.tracking.tracker import MLflowTracker

REPO = Path(__file__).resolve().parents[2]


def test_null_tracker_where_tracking_is_off_or_not_rank0(tmp_path):
    """tracking.enabled=false and ranks > 0 never import mlflow (it need not be installed)."""
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from nin_dist.config import Config, DataConfig, ModelConfig, TrackingConfig\n"
        "from nin_dist.distributed import DistInfo\n"
        "from nin_dist.tracking import NullTracker, make_tracker\n"
        "m = ModelConfig(width=0.1, stem_kernel=3, stem_stride=1, stem_padding=1)\n"
        "off = Config(data=DataConfig(resize=28), model=m, tracking=TrackingConfig(enabled=False))\n"
        "on = Config(data=DataConfig(resize=28), model=m)\n"
        "cpu = torch.device('cpu')\n"
        "a = make_tracker(off, DistInfo(0, 0, 1, 1, cpu, None), Path('.'), None, {})\n"
        "b = make_tracker(on, DistInfo(1, 1, 2, 2, cpu, 'gloo'), Path('.'), None, {})\n"
        "for t in (a, b):\n"
        "    assert isinstance(t, NullTracker) and t.run_id is None\n"
        "    t.log_metrics({'train/loss': 1.0}, 1); t.log_artifact_file(Path('x')); t.close('FAILED')\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=120)


def test_run_logs_everything_to_sqlite(tmp_path, sqlite_uri, splits, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    train, test = splits
    cfg = config(sqlite_uri, "full-run", system_metrics=True)
    tracker = make_tracker(cfg, INFO, tmp_path, None, TRAINER_TAGS)
    assert isinstance(tracker, MLflowTracker)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0", "one request, no retries, while the run is open"
    tracker.log_datasets(train, test)
    before = int(time.time() * 1000)
    for step in range(1, 7):
        tracker.log_metrics(step_metrics(step), step)
    after = time.time() * 1000
    (tmp_path / "config.yaml").write_text("train:\n  epochs: 1\n")
    tracker.log_artifact_file(tmp_path / "config.yaml")
    predictions = test.labels.clone()
    predictions[:7] = (predictions[:7] + 1) % 10
    tracker.log_test_predictions(test, predictions)
    net = NiN(TINY).eval()
    example = to_inputs(test.images[:4], cfg.data)
    tracker.log_model(net, test.images[:4])
    time.sleep(2.5)  # a few system-metric samples
    tracker.close()
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ

    client = MlflowClient(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "full-run"
    assert run.data.params == {k: str(v) for k, v in flatten(cfg).items()}
    tags = run.data.tags
    for key, value in {"kernel": "torch", "device_name": "cpu", "world_size": "1", "nodes": "1", "backend": "none",
                       "torch_version": torch.__version__, "mlflow_version": mlflow.__version__}.items():
        assert tags[key] == value, key
    assert "triton_version" in tags and "python_version" in tags, sorted(tags)
    assert "mlflow.user" in tags and "mlflow.source.name" in tags, "MLflow's context tags"
    commit = git_commit() or git_commit(REPO)
    assert tags.get("git_commit") == commit  # None outside a repository (or before its first commit)

    logged = history(client, tracker.run_id)
    assert logged == {k: sorted((s, step_metrics(s)[k]) for s in range(1, 7) if k in step_metrics(s))
                      for k in ("train/loss", "train/lr", "test/acc", "perf/img_per_s")}
    stamps = [m.timestamp for m in client.get_metric_history(tracker.run_id, "train/loss")]
    assert all(before <= t <= after for t in stamps), "metrics keep the time of the call"
    assert any(k.startswith("system/cpu") for k in run.data.metrics), run.data.metrics.keys()

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"fashion-mnist-train[:64]", "fashion-mnist-test[:50]"}
    for split, context in ((train, "training"), (test, "testing")):
        item = inputs[f"fashion-mnist-{split.name}[:{len(split)}]"]
        assert item.dataset.digest == split.digest and item.dataset.source_type == "local"
        assert {t.key: t.value for t in item.tags}["mlflow.data.context"] == context
        assert json.loads(item.dataset.source)["uri"] == str(split.files[0].parent)
        profile = json.loads(item.dataset.profile)
        assert profile["files"] == [str(p) for p in split.files] and profile["num_rows"] == len(split)
        assert json.loads(item.dataset.schema)["mlflow_tensorspec"], "the arrays' schema"

    assert artifact_paths(client, tracker.run_id) == {"config.yaml"} | {f"predictions/{f}" for f in PREDICTION_FILES}
    folder = Path(client.download_artifacts(tracker.run_id, "predictions", str(tmp_path / "down")))
    table = json.loads((folder / "per_class_accuracy.json").read_text())
    assert table["columns"] == ["class", "name", "images", "correct", "accuracy"]
    assert sum(row[2] for row in table["data"]) == 50 and sum(row[3] for row in table["data"]) == 43
    assert (folder / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with torch.no_grad():
        torch.testing.assert_close(logged_model(sqlite_uri, tracker.run_id)(example), net(example))
    assert not (tmp_path / SPOOL_DIR).exists(), "nothing was kept: the spool is gone"


def test_resume_continues_the_same_run(tmp_path, sqlite_uri):
    cfg = config(sqlite_uri, "resumed", experiment="nin-tests-resume")
    first = make_tracker(cfg, INFO, tmp_path, None, TRAINER_TAGS)
    for step in (1, 2, 3):
        first.log_metrics(step_metrics(step), step)
    first.close("KILLED")

    # A restart may change keys that do not change the maths (MLflow refuses to change a param).
    changed = Config(data=cfg.data, model=cfg.model, tracking=cfg.tracking,
                     run=RunConfig(name="resumed", resume=True), train=TrainConfig(max_steps=9))
    second = make_tracker(changed, INFO, tmp_path, first.run_id, TRAINER_TAGS | {"world_size": "2"})
    assert second.run_id == first.run_id
    for step in (4, 5, 6):
        second.log_metrics(step_metrics(step), step)
    second.close()

    client = MlflowClient(sqlite_uri)
    experiment = client.get_experiment_by_name("nin-tests-resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id], "one run, not two"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "None", "the first value stays"
    assert run.data.tags["world_size"] == "2"
    assert [s for s, _ in history(client, run.info.run_id)["train/loss"]] == [1, 2, 3, 4, 5, 6]


def test_resume_of_an_unknown_run_is_a_user_error(tmp_path, sqlite_uri):
    with pytest.raises(TrackingError, match="0123456789abcdef0123456789abcdef.*not in"):
        make_tracker(config(sqlite_uri, "ghost"), INFO, tmp_path, "0123456789abcdef0123456789abcdef", {})
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ, "a tracker that did not start lifts its bounds"
