"""Secrets never reach MLflow or the logs: environment secrets and URI passwords, in everything a run
sends, in MLflow's error texts, and on the screen and disk of the commands (nin-sweep, its nin-train
trial, nin-eval) against a live server."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from helpers import CPU_CONFIG, run
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow_runs import INFO, config, run_models, step_metrics, wait_for
from mlflow_server import free_port

from nin_dist.tracking import make_tracker
from nin_dist.tracking.redaction import redact, redact_error, redact_uri, secret_values, storable_uri


def test_uris_shown_and_kept_without_their_password():
    assert redact_uri("http://me:pw@h:5000/x") == "http://me:***@h:5000/x"
    assert redact_uri("http://h:5000") == "http://h:5000" and redact_uri(None) is None
    assert storable_uri("https://me:pw@h/x") == "https://me@h/x"
    assert storable_uri("sqlite:///a.db") == "sqlite:///a.db"


def test_which_values_are_secrets(monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-3f9a8c1e77")
    monkeypatch.setenv("SHORT_KEY", "1")  # too short to be a secret; replacing it would garble text
    monkeypatch.setenv("USE_SECRET", "true")  # a common word, not a secret
    monkeypatch.setenv("PLAIN", "not-a-secret-by-name")
    secrets = secret_values(("http://me:tok-3f9a8c1e77-longer@h",))
    assert secrets == ["tok-3f9a8c1e77-longer", "tok-3f9a8c1e77"], "longest first"
    assert redact("pw tok-3f9a8c1e77-longer, 1, true", secrets) == "pw ***, 1, true"


def test_secrets_never_reach_mlflow(tmp_path, server, splits, monkeypatch):
    secrets = {"MLFLOW_TRACKING_PASSWORD": "hunter2-tracking-pw", "MY_API_TOKEN": "tok-3f9a8c1e77",
               "AWS_SECRET_ACCESS_KEY": "aws/SECRET+key0123"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    uri_password = "uri-pw-4471"
    uri = server.uri.replace("http://", f"http://alice:{uri_password}@")
    values = [*secrets.values(), uri_password]
    cfg = config(uri, f"run-{secrets['MY_API_TOKEN']}")
    tracker = make_tracker(cfg, INFO, tmp_path, None, {"note": secrets["MY_API_TOKEN"], "kernel": "torch"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"tracking:\n  uri: {uri}\ntoken: {secrets['MY_API_TOKEN']}\n")
    tracker.log_artifact_file(config_file)
    tracker.log_datasets(*splits)
    tracker.close()

    client = MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    texts = [*run.data.params.values(), *run.data.params, *run.data.tags.values(), run.info.run_name]
    for item in run.inputs.dataset_inputs:
        texts += [item.dataset.source, item.dataset.profile, item.dataset.name]
    folder = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "down")))
    texts += [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]
    for text in texts:
        for value in values:
            assert value not in text, f"secret {value!r} found in {text[:200]!r}"
    assert run.data.params["tracking.uri"] == server.uri.replace("http://", "http://alice:***@")
    assert "token: ***" in (folder / "config.yaml").read_text()


def test_mlflow_error_texts_lose_their_passwords(monkeypatch):
    """MLflow's own error for a request to a store that is not there quotes the URL, password
    included; every URI password goes, whether or not it is a known secret, and so do the secrets."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception) as caught:
        MlflowClient(f"http://alice:pw-9c3e71@127.0.0.1:{free_port()}").log_batch("a" * 32, [Metric("x", 1.0, 1, 1)])
    assert "pw-9c3e71" in str(caught.value), "the error this guards against"
    line = redact_error(caught.value, [])
    assert "pw-9c3e71" not in line and "alice:***@127.0.0.1" in line and "\n" not in line
    assert redact_error(RuntimeError("token tok-3f9a8c1e77 for sqlite://u:p@h/x"), ["tok-3f9a8c1e77"]) == \
        "token *** for sqlite://u:***@h/x"


def test_a_lost_store_logs_no_password(tmp_path, server, caplog):
    """The warning for a failed send quotes MLflow's error text: with the URI's password as ***."""
    password = "uri-pw-5182"
    uri = server.uri.replace("http://", f"http://alice:{password}@")
    tracker = make_tracker(config(uri, "lost-with-password", timeout_s=10.0), INFO, tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    wait_for(lambda: MlflowClient(server.uri).get_run(tracker.run_id).data.metrics, "step 1 sent")
    server.kill()
    try:
        with caplog.at_level(logging.DEBUG, logger="nin_dist.tracking"):
            tracker.log_metrics(step_metrics(2), 2)
            tracker.close("FAILED")
    finally:
        server.start()
    messages = [r.getMessage() for r in caplog.records]
    assert any("sending to" in m and "failed (API request to http://alice:***@" in m for m in messages), messages
    assert not any(password in m for m in messages), [m for m in messages if password in m]


@pytest.mark.slow
def test_no_password_on_screen_or_on_disk_from_nin_sweep_nin_train_and_nin_eval(tmp_path, server):
    """A password in tracking.uri and a live server: MLflow prints "View run NAME at: <the URI as given>"
    when a run ends, password included; the commands turn that off and log their own link without it.
    One nin-sweep of one trial (a nin-train job, whose whole output is its trial-0.log), then nin-eval of
    that trial's model: their stdout and stderr, and every file they wrote, are searched."""
    password = "pw-5c1e-on-screen"
    uri = server.uri.replace("http://", f"http://nin:{password}@")
    config = tmp_path / "cfg.yaml"
    config.write_text(CPU_CONFIG.read_text() + "sweep:\n  optim.lr: {type: float, low: 0.04, high: 0.05}\n")
    tiny = ["data.train_limit=256", "data.test_limit=100", "train.epochs=1", "train.batch_size=128", "model.width=0.25",
            "optim.warmup_epochs=0", "train.threads=1", "train.precision=fp32", "tracking.system_metrics=false",
            "tracking.experiment=passwords", f"tracking.uri={uri}"]
    rc, swept = run([sys.executable, "-m", "nin_dist.sweep", "--config", str(config), "--trials", "1", "--study", "pw",
                     *tiny, f"run.out_dir={tmp_path}/sweep"], timeout=300, cwd=tmp_path)
    assert rc == 0, swept[-4000:]
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("passwords").experiment_id
    (trial,) = [r for r in client.search_runs([experiment]) if r.info.run_name == "trial-0"]
    model = f"models:/{run_models(client, trial)['model']}"
    rc, evaluated = run([sys.executable, "-m", "nin_dist.eval_cli", model, "--json", str(tmp_path / "eval.json"),
                         f"tracking.uri={uri}", "tracking.experiment=passwords"], timeout=180, cwd=tmp_path)
    assert rc == 0, evaluated[-4000:]

    trained = (tmp_path / "sweep" / "trial-0.log").read_text()
    assert "nin_dist.train" in trained and "tracking: MLflow run" in trained, "the trial's whole output is its log"
    argv = trained.splitlines()[0]  # the trial's command line as `ps` shows it: the URI goes by environment
    assert argv.startswith("$ ") and "tracking.uri" not in argv and server.uri.partition("//")[2] not in argv, argv
    screens = {"nin-sweep": swept, "nin-train": trained, "nin-eval": evaluated}
    for name, text in screens.items():
        assert password not in text, f"{name} shows the password: " + text[text.find(password) - 200:][:400]
        assert "View run" not in text, f"{name} shows MLflow's own run line"
    # Each shows its run's page instead, without the credentials (a browser asks for them).
    page = re.escape(server.uri) + r"/#/experiments/\d+/runs/[0-9a-f]{32}"
    assert re.search(r"tracking: view run [0-9a-f]{32} at " + page, trained)
    assert re.search(r"tracking: view evaluation run [0-9a-f]{32} at " + page, evaluated)
    assert re.search(r"sweep: view the parent run at " + page, swept)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    written = {str(p.relative_to(tmp_path)) for p in files}
    assert {"sweep/optuna.journal", "sweep/trial-0.log", "sweep/trial-0/config.yaml", "sweep/trial-0/metrics.json",
            "sweep/trial-0/checkpoints/last.pt", "eval.json"} <= written, written
    leaks = [str(p) for p in files if password.encode() in p.read_bytes()]
    assert not leaks, f"the password is written in {leaks}"
