"""tracking.register_model, and the registered model in use through MLflow's own tools.

One tiny real nin-train run (train.tta on) into a real sqlite store registers its model; the module's
tests share it. Loaded back by alias with mlflow.pytorch, the plain network computes what the run's
checkpoint computes. Served by `mlflow models serve -m models:/NAME/VERSION --env-manager local`
on 127.0.0.1, the raw test images get the classes and probabilities `nin-eval --predictions` gives
(to 1e-6) and the run's test/acc; so does batch scoring with `mlflow models predict`. Bad input gets
HTTP 400 from the server and one line from `predict`. Then the tracker against a real server that
dies before the model is sent: the registration waits in the spool and `--sync-tracking` makes the
version; sending the record again makes no second one.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import warnings

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import requests
import torch
from helpers import CPU_CONFIG, data_dir, env, finish, free_port, start, train_in_process
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow_runs import INFO, TINY, config, run_models, step_metrics, wait_for

from nin_dist import checkpoint
from nin_dist.config import load_config
from nin_dist.data import CLASSES, load_split, to_inputs
from nin_dist.model import NiN, build_model
from nin_dist.model_source import open_model
from nin_dist.precision import native_bf16
from nin_dist.sweep.parent import ParentRun
from nin_dist.tracking import make_tracker
from nin_dist.tracking import sync as sync_spool
from nin_dist.tracking.records import apply_record
from nin_dist.tracking.spool import Spool

pytestmark = pytest.mark.slow
TEST_IMAGES = 100
SMOKE = ["data.train_limit=256", f"data.test_limit={TEST_IMAGES}", "train.epochs=1", "train.batch_size=128",
         "model.width=0.25", "train.tta=true", "train.progress=false", "train.threads=1", "train.device=cpu",
         "tracking.system_metrics=false", "train.precision=fp32"]
NAME = "nin-reg"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, sqlite_uri):
    """The run (trained once for the module): its folder, store, MLflow run and registered version."""
    root = tmp_path_factory.mktemp("registered")
    args = ["--config", str(CPU_CONFIG), *SMOKE, f"tracking.uri={sqlite_uri}", f"tracking.register_model={NAME}",
            f"run.out_dir={root}/run", "run.name=reg"]
    assert train_in_process(args) == 0
    client = MlflowClient(sqlite_uri)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    return {"root": root, "uri": sqlite_uri, "client": client, "version": version,
            "run": client.get_run(version.run_id), "images": load_split(data_dir(), "test", limit=TEST_IMAGES)}


def test_a_run_registers_its_model_and_the_alias_loads_it(registered, tmp_path):
    client, version, run, root = registered["client"], registered["version"], registered["run"], registered["root"]
    assert run.info.run_name == "reg"
    assert version.source == f"models:/{run_models(client, run)['model']}"
    # The model page's signature: raw uint8 images in; label, class name and probabilities out.
    signature = mlflow.models.get_model_info(f"models:/{NAME}/{version.version}").signature
    assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "uint8", "shape": (-1, 28, 28)}}]
    assert signature.outputs.input_names() == ["label", "class_name", "probabilities"]

    # nin-sweep's alias on the run's version (as for its best trial), then the plain network loaded by alias.
    parent = ParentRun(client, version.run_id)
    assert parent.alias_best(NAME, version.run_id) == f"models:/{NAME}@best"
    mlflow.set_tracking_uri(registered["uri"])
    with pytest.raises(MlflowException, match="pytorch"):  # the served model is no network: its signature says so
        mlflow.pytorch.load_model(f"models:/{NAME}@best")
    loaded = open_model(f"models:/{NAME}@best", registered["uri"], tmp_path).loaded  # the network beside it

    cfg = load_config(CPU_CONFIG, SMOKE)
    net = build_model(cfg.model, torch.device("cpu"))
    net.load_state_dict(checkpoint.load(root / "run" / "checkpoints" / "last.pt")[checkpoint.MODEL])
    batch = to_inputs(registered["images"].images[:8], cfg.data)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), net.eval()(batch), rtol=1e-5, atol=1e-5)


def test_each_logged_model_takes_what_its_signature_says(registered):
    """An MLflow model has one signature for all its flavors: the served model's (raw uint8 images) and
    the plain network's (preprocessed floats) are two models, each loaded by its own flavors, each fed
    an input built from its signature alone."""
    models = run_models(registered["client"], registered["run"])
    mlflow.set_tracking_uri(registered["uri"])
    served, network = (mlflow.models.get_model_info(f"models:/{models[name]}") for name in ("model", "network"))
    assert set(served.flavors) == {"python_function"} and set(network.flavors) == {"python_function", "pytorch"}

    (images,) = served.signature.inputs.inputs
    answer = mlflow.pyfunc.load_model(served.model_uri).predict(np.zeros((3, *images.shape[1:]), images.type))
    assert list(answer.columns) == served.signature.outputs.input_names() and len(answer) == 3

    (inputs,), (logits,) = network.signature.inputs.inputs, network.signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype(np.float32), (-1, 1, 28, 28))
    assert (logits.type, logits.shape) == (np.dtype(np.float32), (-1, 10))
    x = np.random.default_rng(0).standard_normal((3, *inputs.shape[1:])).astype(inputs.type)
    with torch.no_grad():
        out = mlflow.pytorch.load_model(network.model_uri)(torch.from_numpy(x))
    assert out.dtype == torch.float32 and tuple(out.shape) == (3, *logits.shape[1:])
    by_pyfunc = mlflow.pyfunc.load_model(network.model_uri).predict(x)
    np.testing.assert_allclose(by_pyfunc, out.numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["fp32", "bf16", "fp64"])
def precision_run(request, registered, tmp_path_factory, sqlite_uri):
    """A run in `train.precision` = the param that logged its model: the module's run for fp32, else
    one more tiny run (two steps)."""
    if request.param == "fp32":
        return registered["run"], registered["root"] / "run"
    if request.param == "bf16" and not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (avx512_bf16, amx_bf16, Arm bf16): a bf16 run would be emulated")
    root = tmp_path_factory.mktemp(request.param)
    overrides = [arg for arg in SMOKE if not arg.startswith(("train.precision=", "data.train_limit="))]
    args = ["--config", str(CPU_CONFIG), *overrides, "data.train_limit=128", "train.max_steps=2",
            f"train.precision={request.param}", f"tracking.uri={sqlite_uri}", f"run.out_dir={root}/run",
            f"run.name={request.param}"]
    assert train_in_process(args) == 0
    client = MlflowClient(sqlite_uri)
    run_id = json.loads((root / "run" / "metrics.json").read_text())["mlflow_run_id"]
    return client.get_run(run_id), root / "run"


def test_the_runs_test_acc_and_loss_are_what_its_logged_model_scores(precision_run, registered):
    """bf16 evaluates under autocast, fp64 in float64; the model is served in fp32: the run's final
    test/acc and test/loss, the model's linked metrics and metrics.json are the served model's, scored
    here with mlflow.pyfunc.load_model over the run's test images."""
    run, run_dir = precision_run
    model_id = run_models(registered["client"], run)["model"]
    mlflow.set_tracking_uri(registered["uri"])
    answer = mlflow.pyfunc.load_model(f"models:/{model_id}").predict(registered["images"].images.numpy())
    labels = registered["images"].labels.numpy()
    accuracy = float(np.mean(answer["label"].to_numpy() == labels))
    loss = float(-np.log(np.array(answer["probabilities"].tolist())[np.arange(len(labels)), labels]).mean())

    linked = {m.key: m.value for m in registered["client"].get_logged_model(model_id).metrics}
    written = json.loads((run_dir / "metrics.json").read_text())
    for shown in (run.data.metrics, linked, {"test/acc": written["test_acc"], "test/loss": written["test_loss"]}):
        assert shown["test/acc"] == pytest.approx(accuracy, abs=1e-12)
        assert shown["test/loss"] == pytest.approx(loss, abs=1e-6)  # bf16's differs from 1e-4 up


def mlflow_cli(registered, *args: str):
    """`mlflow ARGS` (python -m mlflow) against the module's store, from the run's folder."""
    return start([sys.executable, "-m", "mlflow", *args], cwd=registered["root"],
                 env=env(MLFLOW_TRACKING_URI=registered["uri"]))


@pytest.fixture(scope="module")
def served(registered):
    """`mlflow models serve` of the registered version on 127.0.0.1, started once; its base URL."""
    port = free_port()
    proc = mlflow_cli(registered, "models", "serve", "-m", f"models:/{NAME}/{registered['version'].version}",
                      "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1")
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, finish(proc, 5)[1][-3000:]
        try:
            return requests.get(f"{url}/ping", timeout=1).ok
        except requests.RequestException:
            return False

    wait_for(up, "mlflow models serve answers /ping", timeout_s=120)
    yield url
    os.killpg(proc.pid, signal.SIGKILL)  # the command and the uvicorn server it started
    finish(proc, 30)


def predictions_of(rows: list[dict]) -> tuple[list[int], np.ndarray]:
    """(labels, probabilities) of the served model's answer, checked to be a distribution per image
    whose argmax is the label and whose class name goes with it."""
    labels = [row["label"] for row in rows]
    probs = np.array([row["probabilities"] for row in rows])
    assert probs.shape == (len(rows), len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert labels == probs.argmax(1).tolist() and [row["class_name"] for row in rows] == [CLASSES[k] for k in labels]
    return labels, probs


def test_the_served_model_answers_raw_images_as_nin_eval_scores_them(registered, served, tmp_path):
    version = f"models:/{NAME}/{registered['version'].version}"
    images = registered["images"]
    (tmp_path / "images.json").write_text(json.dumps({"inputs": images.images.tolist()}))
    jobs = {"eval": start([sys.executable, "-m", "nin_dist.eval_cli", version, "--predictions",
                           str(tmp_path / "eval.csv"), "tracking.enabled=false"], cwd=tmp_path,
                          env=env(MLFLOW_TRACKING_URI=registered["uri"])),
            "batch": mlflow_cli(registered, "models", "predict", "-m", version, "-i", str(tmp_path / "images.json"),
                                "-o", str(tmp_path / "batch.json"), "-t", "json", "--env-manager", "local")}
    answer = requests.post(f"{served}/invocations", json={"inputs": images.images.tolist()}, timeout=60)
    assert answer.status_code == 200, answer.text[-2000:]
    labels, probs = predictions_of(answer.json()["predictions"])
    for key, job in jobs.items():
        rc, out = finish(job, timeout=180)
        assert rc == 0, f"{key}: {out[-3000:]}"

    with open(tmp_path / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["true_label"]) for r in rows] == images.labels.tolist()
    assert labels == [int(r["label"]) for r in rows], "the same classes as nin-eval"
    by_eval = np.array([[float(r[f"p{k}"]) for k in range(len(CLASSES))] for r in rows])
    assert np.abs(probs - by_eval).max() <= 1e-6
    accuracy = float(np.mean(np.array(labels) == images.labels.numpy()))
    assert accuracy == pytest.approx(registered["run"].data.metrics["test/acc"], abs=1e-12)

    batch_labels, batch_probs = predictions_of(json.loads((tmp_path / "batch.json").read_text())["predictions"])
    assert batch_labels == labels and np.abs(batch_probs - probs).max() <= 1e-6

    # One image in the (N, 1, 28, 28) form, as a channel-first array holds it: the same answer.
    one = requests.post(f"{served}/invocations", json={"inputs": images.images[:1, None].tolist()}, timeout=60)
    assert one.status_code == 200 and predictions_of(one.json()["predictions"])[0] == labels[:1]


SCALED = "floats (send the raw pixel integers, not scaled or normalised ones)"
BAD_INPUTS = {  # JSON body -> what the refusal says it got
    "scaled": ({"inputs": [[[0.5] * 28] * 28]}, SCALED),
    "whole floats": ({"inputs": [[[255.0] * 28] * 28]}, SCALED),
    "flat": ({"inputs": [[0] * 784]}, "got shape (1, 784)"),
    "three channels": ({"inputs": [[[[0] * 28] * 28] * 3]}, "got shape (1, 3, 28, 28)"),
    "too bright": ({"inputs": [[[300] * 28] * 28]}, "got values from 300 to 300"),
    "negative": ({"inputs": [[[-1] * 28] * 28]}, "got values from -1 to -1"),
    "ragged": ({"inputs": [[[0] * 28] * 27 + [[0] * 5]]}, "got lists that are not a rectangular array"),
    "strings": ({"inputs": [[["a"] * 28] * 28]}, "got strings"),
    "empty": ({"inputs": []}, "got shape (0,)"),
}


def test_bad_input_gets_http_400_naming_what_was_expected(served):
    for case, (body, says) in BAD_INPUTS.items():
        answer = requests.post(f"{served}/invocations", json=body, timeout=60)
        assert answer.status_code == 400, (case, answer.status_code, answer.text[:500])
        message = answer.json()["message"]
        assert "expected uint8 images of shape (N, 28, 28) or (N, 1, 28, 28) with values 0-255" in message, case
        assert says in message, (case, message[-300:])
    # A CSV table has no image shape: MLflow's server refuses it before the model sees it.
    answer = requests.post(f"{served}/invocations", data="0,1,2", headers={"Content-Type": "text/csv"}, timeout=60)
    assert answer.status_code == 400, answer.text[:500]


def test_predict_in_python_answers_raw_images_and_refuses_bad_ones_in_one_line(registered):
    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/{registered['version'].version}")
    images = registered["images"].images[:3].numpy()
    answer = model.predict(images)
    assert list(answer.columns) == ["label", "class_name", "probabilities"] and len(answer) == 3
    assert model.predict(images[:, None]).label.tolist() == answer.label.tolist()
    # Any integer array within 0-255 is an image: int64 (np.array of Python ints), uint16, and a
    # read-only uint8 array read straight from the IDX bytes (np.frombuffer), with no warning.
    read_only = np.frombuffer(images.tobytes(), dtype=np.uint8).reshape(3, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for same in (images.astype(np.int64), images.astype(np.uint16), read_only):
            assert model.predict(same).label.tolist() == answer.label.tolist(), same.dtype
    for bad, says in ((images.astype(np.float32) / 255, "got a float32 array (send the raw pixel integers"),
                      (images.astype(np.int64) + 1, "got values from 1 to 256"),
                      (images.astype(np.int16) - 1, "got values from -1 to 254"),
                      (images.astype(bool), "got a bool array"),
                      (images.reshape(3, 784), "got shape (3, 784)"),
                      (images[:, :14], "got shape (3, 14, 28)"), ("an image", "got a str")):
        with pytest.raises(MlflowException) as caught:
            model.predict(bad)
        assert "\n" not in caught.value.message and says in caught.value.message, caught.value.message
        assert caught.value.message.startswith("expected uint8 images of shape (N, 28, 28) or (N, 1, 28, 28)")


def test_registration_waits_out_an_outage_and_is_sent_once(tmp_path, server, splits):
    _, test = splits
    tracker = make_tracker(config(server.uri, "reg-outage", timeout_s=5.0, register_model="nin-outage"), INFO,
                           tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    server.kill()
    try:
        tracker.log_model(NiN(TINY).eval(), test.images[:2])
        tracker.close()
        kept = [json.loads(line)["kind"] for line in Spool(tmp_path).records_path.read_text().splitlines()]
        assert kept[-3:] == ["model", "register", "terminate"], kept
    finally:
        server.start()
    assert sync_spool(tmp_path) == 0
    client = MlflowClient(server.uri)
    (version,) = client.search_model_versions("name = 'nin-outage'")
    assert version.run_id == tracker.run_id
    record = {"kind": "register", "run_id": tracker.run_id, "name": "nin-outage", "model": "model"}
    apply_record(client, record, tmp_path)  # a resend (a crash before the spool noted it sent)
    assert [v.version for v in client.search_model_versions("name = 'nin-outage'")] == [version.version]
