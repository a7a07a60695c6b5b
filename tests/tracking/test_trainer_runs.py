"""MLflow tracking through the real trainer: torchrun with 2 gloo processes, a world of one, the CLI.

Each run trains the cpu config on the first 512 / 256 images for one epoch (2 steps) and is read
back with MlflowClient from its sqlite store or the module's real server. The runs that log a model
print no Python warning. A worker killed and restarted keeps one MLflow run: tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from helpers import data_dir
from mlflow import MlflowClient
from mlflow_runs import PREDICTION_FILES, run_models

from nin_dist.bench import trace
from nin_dist.config import flatten, load_config
from nin_dist.data import load_split, to_inputs
from nin_dist.precision import resolve_config

REPO = Path(__file__).resolve().parents[2]
SMOKE = ["data.train_limit=512", "data.test_limit=256", "train.epochs=1", "train.batch_size=256",
         "train.progress=false", "tracking.system_metrics=false"]

pytestmark = pytest.mark.slow
# A Python warning as `warnings` prints it: "<file>:<line>: <Category>Warning: <message>".
WARNING_LINE = re.compile(r"^.+:\d+: \w*Warning: .*$", re.MULTILINE)


def train(cwd: Path, *args: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """nin-train (under torchrun when nproc > 1) in `cwd`; fails the test with the output on error."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    env = os.environ | {"NIN_DATA_DIR": str(data_dir())}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PYTHONWARNINGS", None)  # the default warning filters: what a user sees
    proc = subprocess.run([*launcher, "-m", "nin_dist.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"nin-train exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def assert_clean_log(proc: subprocess.CompletedProcess) -> None:
    """No Python warning in the run's output: nothing a user would have to learn to ignore."""
    found = WARNING_LINE.findall(proc.stdout + proc.stderr)
    assert not found, "\n".join(found)


def only_run(uri: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_torchrun_two_processes_log_one_complete_run_to_a_real_server_and_its_ui(tmp_path, server):
    """A 2-process job against `launch/mlflow-server.sh` (the module's server): one complete run, read
    back with MlflowClient, and the UI's page and REST endpoints return it with its metrics."""
    import requests

    uri = server.uri
    # Both steps in a profile window: each rank's trace, rank 0's summary, all logged under profile/.
    overrides = [*SMOKE, f"tracking.uri={uri}", "run.name=e2e", f"run.out_dir={tmp_path}/run",
                 "train.profile_start=1", "train.profile_steps=2"]
    assert_clean_log(train(tmp_path, "--config", str(REPO / "configs" / "cpu.yaml"), *overrides, nproc=2))

    client, run = only_run(uri)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    # The precision logged is the one the run used: cpu.yaml's `auto` made concrete for this CPU.
    resolved = resolve_config(load_config(REPO / "configs" / "cpu.yaml", [*overrides]), torch.device("cpu"))
    params = {k: str(v) for k, v in flatten(resolved).items()}
    assert params["train.precision"] in ("fp32", "bf16")
    params["run.out_dir"] = f"{tmp_path}/run"
    assert run.data.params == params
    tags = run.data.tags
    assert (tags["world_size"], tags["nodes"], tags["backend"], tags["kernel"], tags["device_name"]) == \
        ("2", "1", "gloo", "torch", "cpu")
    assert {"torch_version", "triton_version", "mlflow_version"} <= set(tags)

    steps = {k: [m.step for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}
    assert steps["train/loss"] == [1] and steps["train/lr"] == [1]  # step 1 (then every log_every steps)
    for key in ("train/epoch_loss", "train/acc", "perf/img_per_s", "perf/epoch_s", "perf/mfu"):
        assert steps[key] == [2], key
    for key in ("test/loss", "test/acc"):  # the evaluation's, then the logged model's as served (the value shown)
        assert steps[key] == [2, 2], key

    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    test_split = load_split(data_dir(), "test", limit=256)
    assert set(inputs) == {"fashion-mnist-train[:512]", "fashion-mnist-test[:256]"}
    assert inputs["fashion-mnist-test[:256]"].dataset.digest == test_split.digest

    paths = {a.path for a in client.list_artifacts(run_id)} | \
        {a.path for folder in ("predictions", "profile") for a in client.list_artifacts(run_id, folder)}
    traces = [f"rank{rank}-steps1-2.trace.json.gz" for rank in (0, 1)]
    assert paths == {"config.yaml", "metrics.json", "predictions", "profile"} | \
        {f"predictions/{f}" for f in PREDICTION_FILES} | {f"profile/{f}" for f in [*traces, "summary.txt"]}
    for name in traces:  # the regions of tests/test_profiling.py, and DDP's all-reduce of the gradients
        names = {e["name"] for e in trace.load(tmp_path / "run" / "profile" / name)}
        assert {"block2/conv5x5", "block2/batchnorm", "block2/pair1x1", "pool1", "loss", "backward",
                "optimizer.step"} <= names, sorted(names)
        assert trace.analyze(tmp_path / "run" / "profile" / name)["allreduce_ms"] > 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == run_id
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test_acc"])

    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model(f"models:/{run_models(MlflowClient(uri), run)['network']}")
    x = to_inputs(test_split.images[:4], resolved.data)
    assert model(x).shape == (4, 10)
    assert not (tmp_path / "run" / "tracking-spool").exists()

    # What the UI shows: its page, and the run with its metrics from the endpoints the page calls.
    assert requests.get(uri + "/", timeout=10).status_code == 200
    experiments = requests.get(uri + "/ajax-api/2.0/mlflow/experiments/get-by-name",
                               params={"experiment_name": "nin-fashion-mnist"}, timeout=10).json()
    found = requests.post(uri + "/ajax-api/2.0/mlflow/runs/search", timeout=10,
                          json={"experiment_ids": [experiments["experiment"]["experiment_id"]]}).json()["runs"]
    assert [r["info"]["run_id"] for r in found] == [run_id]
    assert {m["key"] for m in found[0]["data"]["metrics"]} >= {"test/acc", "train/loss", "perf/img_per_s"}


def test_restart_continues_the_same_run(tmp_path):
    """A second start of the same run folder resumes the checkpoint and the MLflow run with it."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = ["--config", str(REPO / "configs" / "cpu.yaml"), *SMOKE, f"tracking.uri={uri}", "run.name=again",
              f"run.out_dir={tmp_path}/run", "tracking.log_model=false"]  # the model: the tests above and below
    assert_clean_log(train(tmp_path, *common, "train.max_steps=1"))
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["mlflow_run_id"]
    assert_clean_log(train(tmp_path, *common))  # the second start resumes
    client, run = only_run(uri)
    assert run.info.run_id == first == json.loads((tmp_path / "run" / "metrics.json").read_text())["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    # Each start evaluates at its end: step 1 (max_steps), then step 2 (the epoch's end).
    assert [m.step for m in client.get_metric_history(first, "test/acc")] == [1, 2]
    assert {m.step for m in client.get_metric_history(first, "train/loss")} == {1}
    assert {m.step for m in client.get_metric_history(first, "train/epoch_loss")} == {1, 2}
    assert run.data.params["train.max_steps"] == "1", "params keep their first value"


def test_a_start_that_failed_in_step_1_is_resumed_or_started_afresh_with_a_fixed_config(tmp_path, sqlite_uri,
                                                                                         capsys):
    """The checkpoint before step 1 carries the run (its MLflow run id): the same job restarted resumes
    it. It holds no step of training, so it does not hold the config: a fixed config (a sane lr, and
    another seed) starts afresh in that folder, with no run.allow_config_change, in an MLflow run of its
    own: MLflow keeps a run's first params, so the failed run would show the lr that failed."""
    from helpers import assert_bit_identical, overrides, train_in_process

    from nin_dist import checkpoint as ckpt

    def last(folder: Path) -> dict:
        return torch.load(folder / "checkpoints" / "last.pt", weights_only=True)

    out = tmp_path / "run"
    tiny = {"data__train_limit": 128, "data__test_limit": 200, "train__batch_size": 16, "train__epochs": 2}
    tracked = {"tracking__enabled": True, "tracking__uri": sqlite_uri, "tracking__system_metrics": False,
               "tracking__log_model": False, "train__log_every": 1}
    failing = overrides(out, **tiny, **tracked, optim__lr=1e30, seed=1)
    assert train_in_process(failing) == 2  # NaN at step 2's loss check; last.pt is the start's
    start = last(out)
    assert start[ckpt.STEP] == 0 and start[ckpt.MLFLOW_RUN_ID]
    assert train_in_process(failing) == 2  # the same job again: it resumes its start, in its MLflow run
    assert last(out)[ckpt.MLFLOW_RUN_ID] == start[ckpt.MLFLOW_RUN_ID]
    capsys.readouterr()

    assert train_in_process(overrides(out, **tiny, **tracked, train__max_steps=1)) == 0
    err = capsys.readouterr().err
    assert "holds no step of training and was written by a different config (changed: optim.lr, seed)" in err, err
    assert "resuming from" not in err
    fixed = last(out)
    assert fixed[ckpt.STEP] == 1 and fixed[ckpt.MLFLOW_RUN_ID] != start[ckpt.MLFLOW_RUN_ID]
    assert train_in_process(overrides(tmp_path / "fresh", **tiny, train__max_steps=1)) == 0
    assert_bit_identical(fixed[ckpt.MODEL], last(tmp_path / "fresh")[ckpt.MODEL])  # as in a new folder
    client = MlflowClient(sqlite_uri)
    failed, trained = client.get_run(start[ckpt.MLFLOW_RUN_ID]), client.get_run(fixed[ckpt.MLFLOW_RUN_ID])
    assert (failed.info.status, failed.data.params["optim.lr"], failed.data.params["seed"]) == ("FAILED", "1e+30", "1")
    assert (trained.info.status, trained.data.params["optim.lr"], trained.data.params["seed"]) == ("FINISHED", "0.05",
                                                                                                   "0")


def test_tracking_disabled_never_imports_mlflow(tmp_path):
    code = ("import sys\n"
            "from nin_dist.train import main\n"
            f"rc = main(['--config', {str(REPO / 'configs' / 'cpu.yaml')!r}, *{SMOKE!r}, 'train.max_steps=1',\n"
            "            'tracking.enabled=false', 'run.name=off'])\n"
            "assert rc == 0, rc\n"
            "assert 'mlflow' not in sys.modules, 'mlflow imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=os.environ | {"NIN_DATA_DIR": str(data_dir())},
                   check=True, timeout=300)
    assert not (tmp_path / "mlflow.db").exists()
    assert json.loads((tmp_path / "runs" / "off" / "metrics.json").read_text())["mlflow_run_id"] is None


def test_sync_tracking_cli(tmp_path, capsys):
    from nin_dist.train import main

    spool = tmp_path / "run" / "tracking-spool"
    spool.mkdir(parents=True)
    assert main(["--sync-tracking", str(tmp_path / "run")]) == 0, "nothing to send is fine"
    spool.mkdir(parents=True)
    (spool / "run.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:9"}))
    (spool / "records.jsonl").write_text(json.dumps({"kind": "metrics", "run_id": "a" * 32, "step": 1,
                                                     "timestamp": 1, "metrics": {"x/y": 1.0}}) + "\n")
    capsys.readouterr()
    assert main(["--sync-tracking", str(tmp_path / "run")]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "http://127.0.0.1:9" in error[0] and "unreachable" in error[0], error
    assert (spool / "records.jsonl").exists(), "kept for a later try"


def test_the_recipe_logs_val_every_epoch_test_at_the_end_and_the_ema_as_the_model(tmp_path):
    """data.val_size, train.ema_decay, train.tta and data.augment on, in a world of one."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [*SMOKE, "train.epochs=2", "train.batch_size=128", "data.val_size=128", "train.ema_decay=0.9",
                 "train.tta=true", "data.augment=true", "data.erase=0.5", f"tracking.uri={uri}", "run.name=recipe",
                 f"run.out_dir={tmp_path}/run"]
    assert_clean_log(train(tmp_path, "--config", str(REPO / "configs" / "cpu.yaml"), *overrides))
    client, run = only_run(uri)
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
             for k in ("val/acc", "val/loss", "test/acc", "test/loss")}
    # 3 steps an epoch; the test split at the end, by the evaluation, then by the logged model as served
    assert steps == {"val/acc": [3, 6], "val/loss": [3, 6], "test/acc": [6, 6], "test/loss": [6, 6]}
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run.data.metrics["val/acc"] == pytest.approx(metrics["val_acc"])
    contexts = {i.dataset.name: [t.value for t in i.tags if t.key == "mlflow.data.context"]
                for i in run.inputs.dataset_inputs}
    assert contexts == {"fashion-mnist-train/train(384)": ["training"], "fashion-mnist-train/val(128)": ["validation"],
                        "fashion-mnist-test[:256]": ["testing"]}

    mlflow.set_tracking_uri(uri)
    logged = mlflow.pytorch.load_model(f"models:/{run_models(client, run)['network']}").state_dict()
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(logged[k], state["ema"][k]) for k in logged), "the logged model is the EMA"
    assert not torch.equal(logged["0.0.weight"], state["model"]["0.0.weight"])
