"""Secrets never reach MLflow or the logs: environment secrets and URI passwords, in everything a run
sends and in MLflow's error texts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow_runs import INFO, config, step_metrics, wait_for
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
