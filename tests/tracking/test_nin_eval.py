"""`nin-eval` against a real tracked `nin-train` run: every way of naming its model gives the run's test/acc.

One tiny run (real Fashion-MNIST, train.tta on, a sqlite MLflow store under tmp_path, a network of
chosen widths and later kernels, not the seed's) trains and logs its model; `nin-eval` processes then
score it by LoggedModel id, by registered alias, by run URI and from the checkpoint (rebuilt from the
run's config.yaml), each compared with the run's test/acc as MLflow and metrics.json hold
it. TTA is checked against the class probabilities computed here by hand from the checkpoint's
weights, with and without the mirror image."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_CONFIG, data_dir, env, finish, start
from mlflow import MlflowClient
from mlflow_runs import run_models

from nin_dist.config import load_config
from nin_dist.data import CLASSES, load_split, to_inputs
from nin_dist.eval_cli import main
from nin_dist.model import NiN

pytestmark = pytest.mark.slow

RUN = ["data.train_limit=512", "data.test_limit=200", "train.max_steps=16", "train.batch_size=32", "train.epochs=1",
       "model.width=1", "model.widths=16,40,64", "model.kernels=3,5,1", "optim.schedule=constant", "optim.lr=0.05",
       "train.precision=fp32", "train.threads=1", "train.tta=true", "train.progress=false",
       "tracking.system_metrics=false", "run.name=evaluated"]


def nin_eval(cwd: Path, uri: str, *args: str):
    """A started `nin-eval` process (python -m, the module entry) against the store `uri`."""
    return start([sys.executable, "-m", "nin_dist.eval_cli", *args], cwd=cwd,
                 env=env(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run: its folder, store URI, MLflow run, LoggedModel id and metrics.json."""
    root = tmp_path_factory.mktemp("nin-eval")
    uri = f"sqlite:///{root}/mlflow.db"
    proc = start([sys.executable, "-m", "nin_dist.train", "--config", str(CPU_CONFIG), *RUN,
                  f"tracking.uri={uri}", f"run.out_dir={root}/run"], cwd=root)
    rc, out = finish(proc, timeout=240)
    assert rc == 0, out[-4000:]
    client = MlflowClient(uri)
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    run = client.get_run(metrics["mlflow_run_id"])
    return {"root": root, "uri": uri, "client": client, "run": run, "model_id": run_models(client, run)["model"],
            "metrics": metrics}


def read_report(path: Path, split_size: int) -> dict:
    """The --json report, checked for its own consistency: the matrix counts every image once and its
    diagonal is the accuracy, class by class and in all."""
    report = json.loads(path.read_text())
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum().item() == report["images"] == split_size
    assert report["acc"] == pytest.approx(cm.diagonal().sum().item() / split_size, abs=1e-12)
    assert [row["name"] for row in report["per_class"]] == list(CLASSES) == report["classes"]
    for k, row in enumerate(report["per_class"]):
        assert (row["images"], row["correct"]) == (cm[k].sum().item(), cm[k, k].item())
    return report


def test_every_way_of_naming_the_model_gives_the_runs_test_acc(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("NIN_DATA_DIR", str(data_dir()))  # the in-process nin-eval below finds the data as the runs do
    uri, client, run, model_id = trained["uri"], trained["client"], trained["run"], trained["model_id"]
    run_acc = run.data.metrics["test/acc"]
    assert run_acc == pytest.approx(trained["metrics"]["test_acc"], abs=1e-12)
    mlflow.set_tracking_uri(uri)
    version = mlflow.register_model(f"models:/{model_id}", "fashion-nin")
    client.set_registered_model_alias("fashion-nin", "champion", version.version)

    checkpoint = trained["root"] / "run" / "checkpoints" / "last.pt"
    names = {"id": f"models:/{model_id}", "alias": "models:/fashion-nin@champion",
             "run": f"runs:/{run.info.run_id}/model", "checkpoint": str(checkpoint.resolve())}
    untracked = {"alias", "run"}  # loaded from the store, but logging no evaluation run of their own
    jobs = {key: nin_eval(tmp_path, uri, name, "--json", str(tmp_path / f"{key}.json"),
                          *(["tracking.enabled=false"] if key in untracked else []))
            for key, name in names.items()}
    done = {key: finish(job, timeout=180) for key, job in jobs.items()}

    for key in names:
        rc, out = done[key]
        assert rc == 0, f"{key}: {out[-3000:]}"
        report = read_report(tmp_path / f"{key}.json", 200)
        assert abs(report["acc"] - run_acc) <= 1e-6, (key, report["acc"], run_acc)
        assert abs(report["loss"] - run.data.metrics["test/loss"]) <= 1e-5, key
        assert report["model_id"] == (model_id if key != "checkpoint" else None)
        assert f"test loss {report['loss']:.4f}  acc {report['acc']:.4f}" in out  # the printed table
        assert "Ankle boot" in out and "confusion matrix" in out
    checkpoint_report = json.loads((tmp_path / "checkpoint.json").read_text())
    assert checkpoint_report["acc"] == run_acc, "the checkpoint is scored exactly as the run scored it"

    # TTA (the run's train.tta=true): the mean of the image's and its mirror's probabilities, computed
    # here from the weights; train.tta=false on top scores the image alone.
    config_yaml = trained["root"] / "run" / "config.yaml"
    chosen = load_config(config_yaml, defaults_for=("tracking", "run")).model  # the checkpoint's NiN is rebuilt from it
    assert (chosen.block_widths, chosen.kernels) == ((16, 40, 64), (3, 5, 1))
    expected = scored_by_hand(checkpoint, config_yaml, tta=True)
    assert checkpoint_report["tta"] is True
    assert abs(checkpoint_report["acc"] - expected["acc"]) <= 1e-6
    assert abs(checkpoint_report["loss"] - expected["loss"]) <= 1e-5
    assert main([str(checkpoint), "--json", str(tmp_path / "plain.json"), "train.tta=false",
                 "tracking.enabled=false"]) == 0
    plain, by_hand = read_report(tmp_path / "plain.json", 200), scored_by_hand(checkpoint, config_yaml, tta=False)
    assert plain["tta"] is False and abs(plain["acc"] - by_hand["acc"]) <= 1e-6
    assert abs(plain["loss"] - by_hand["loss"]) <= 1e-5 and abs(plain["loss"] - checkpoint_report["loss"]) > 1e-6

    # The evaluation runs: in the model's experiment, the model as their input, their metrics linked to it.
    evals = {r.data.tags["nin.eval.model"]: client.get_run(r.info.run_id)  # get_run: with the model inputs
             for r in client.search_runs([run.info.experiment_id]) if "nin.eval.model" in r.data.tags}
    assert set(evals) == {names["id"], names["checkpoint"]}
    for key in ("id", "checkpoint"):
        evaluated = evals[names[key]]
        report = json.loads((tmp_path / f"{key}.json").read_text())
        assert evaluated.info.status == "FINISHED" and report["mlflow_run_id"] == evaluated.info.run_id
        assert [i.model_id for i in evaluated.inputs.model_inputs] == [model_id], key
        assert evaluated.data.tags["nin.eval.source_run_id"] == run.info.run_id
        assert evaluated.data.metrics["test/acc"] == report["acc"]
        assert evaluated.data.metrics["test/class_acc/ankle_boot"] == report["per_class"][9]["acc"]
        linked = {m.key: m for m in client.get_logged_model(model_id).metrics if m.run_id == evaluated.info.run_id}
        assert linked["test/acc"].value == report["acc"], "the metric is linked to the model"
        assert linked["test/acc"].dataset_name == "fashion-mnist-test[:200]"
        assert [a.path for a in client.list_artifacts(evaluated.info.run_id)] == ["evaluation.json"]


def scored_by_hand(checkpoint: Path, config_yaml: Path, tta: bool) -> dict:
    """Loss and accuracy of the class probabilities of each test image (with `tta`: the mean of the
    image's and its mirror's), from the checkpoint's weights in a NiN of the run's config."""
    cfg = load_config(config_yaml, defaults_for=("tracking", "run"))
    model = NiN(cfg.model).eval()
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    split = load_split(data_dir(), "test", limit=200)
    with torch.no_grad():
        x = to_inputs(split.images, cfg.data)
        p = (F.softmax(model(x), 1) + F.softmax(model(x.flip(-1)), 1)) / 2 if tta else F.softmax(model(x), 1)
    return {"acc": (p.argmax(1) == split.labels).double().mean().item(),
            "loss": -p[torch.arange(len(split)), split.labels].log().mean().item()}


@pytest.mark.parametrize("model, says", [
    ("s3://bucket/model", "is neither a models:/ or runs:/ URI nor an existing checkpoint path"),
    ("models:/m-0123abcd", "not found"),
    ("models:/no-such-model@champion", "not found"),
    ("models:/fashion-nin", "expected models:/m-<id>, models:/NAME@ALIAS or models:/NAME/VERSION"),
    ("garbage.pt", "cannot be loaded as a checkpoint"),
    ("nothing.pt", "nothing.pt: no such checkpoint"),
])
def test_a_model_that_is_not_there_is_one_line_and_exit_2(trained, tmp_path, monkeypatch, capsys, model, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    assert main([model]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nin-eval: error: MODEL") and says in err[0], err


def test_split_val_without_held_out_images_is_refused(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = trained["root"] / "run" / "checkpoints" / "last.pt"
    assert main([str(checkpoint), "--split", "val", "tracking.enabled=false"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--split val" in line and "data.val_size=0" in line


@pytest.mark.parametrize("flag", ["--json", "--predictions"])
def test_an_output_path_in_a_missing_folder_is_one_line_and_exit_2(trained, tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    checkpoint = trained["root"] / "run" / "checkpoints" / "last.pt"
    assert main([str(checkpoint), flag, str(tmp_path / "nowhere" / "out"), "tracking.enabled=false"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("nin-eval: error: ") and flag in line, line
    assert not (tmp_path / "nowhere").exists()
