"""The background sender while the store fails: records kept in call order and sent once it is back.

Against a real `mlflow server` that the tests hang (SIGSTOP) and kill (SIGKILL, like a crash), then
restart on the same port and store; the run must then hold what an undisturbed run holds.
"""

from __future__ import annotations

import json
import logging
import time

import pytest
import torch
from mlflow import MlflowClient
from mlflow_runs import (
    INFO,
    PREDICTION_FILES,
    TINY,
    artifact_paths,
    config,
    history,
    logged_model,
    step_metrics,
    wait_for,
)

from nin_dist.config import DataConfig
from nin_dist.data import to_inputs
from nin_dist.model import NiN
from nin_dist.tracking import make_tracker
from nin_dist.tracking import sync as sync_spool
from nin_dist.tracking.spool import SPOOL_DIR, Spool
from nin_dist.tracking.tracker import MLflowTracker


def test_kept_records_go_first_and_refused_ones_stay_kept(tmp_path, sqlite_uri):
    """A new process of a run sends what an earlier one kept before anything else. A kept record
    the store rejects (here: for a run that does not exist) is skipped and stays in the spool, so it
    neither blocks the rest nor is lost."""
    earlier = make_tracker(config(sqlite_uri, "kept"), INFO, tmp_path / "a", None, {})
    earlier.log_metrics({"x/y": 1.0}, 1)
    earlier.close()
    spool = Spool(tmp_path / "b")
    spool.bind(sqlite_uri)
    spool.append({"kind": "metrics", "run_id": "f" * 32, "step": 1, "timestamp": 1, "metrics": {"x/y": 1.0}})
    spool.append({"kind": "terminate", "run_id": "f" * 32, "status": "FINISHED", "end_time": 2})
    spool.append({"kind": "metrics", "run_id": earlier.run_id, "step": 2, "timestamp": 3, "metrics": {"x/y": 2.0}})
    later = make_tracker(config(sqlite_uri, "kept-later"), INFO, tmp_path / "b", None, {})
    later.log_metrics({"x/y": 5.0}, 5)
    later.close()
    client = MlflowClient(sqlite_uri)
    assert history(client, earlier.run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}
    assert history(client, later.run_id) == {"x/y": [(5, 5.0)]}
    assert [json.loads(line)["run_id"] for line in spool.records_path.read_text().splitlines()] == ["f" * 32] * 2
    assert spool.pending() == 2


def test_close_with_an_unwritable_spool_says_what_is_lost(tmp_path, server, caplog):
    """The store is gone and the spool cannot be written (records.jsonl turned into a folder: the
    same OSError as a full disk, which root's permissions cannot fake): close() returns, with one
    error line naming what was lost."""
    tracker = make_tracker(config(server.uri, "unwritable", timeout_s=10.0), INFO, tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    wait_for(lambda: MlflowClient(server.uri).get_run(tracker.run_id).data.metrics, "step 1 sent")
    Spool(tmp_path).records_path.mkdir(parents=True)
    server.kill()
    try:
        tracker.log_metrics(step_metrics(2), 2)
        with caplog.at_level(logging.WARNING, logger="nin_dist.tracking"):
            tracker.close("FINISHED")
    finally:
        server.start()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "2 records of MLflow run" in errors[0] and "metrics: 1, terminate: 1" in errors[0], errors[0]
    assert "IsADirectoryError" in errors[0] and not any(r.exc_info for r in caplog.records)


def test_close_returns_while_the_server_hangs(tmp_path, server):
    """A hung server costs close() about two request timeouts, not MLflow's minutes of retries."""
    tracker = make_tracker(config(server.uri, "hung-at-close", timeout_s=2.0), INFO, tmp_path, None, {})
    tracker.log_metrics(step_metrics(1), 1)
    server.freeze()
    try:
        tracker.log_metrics(step_metrics(2), 2)
        started = time.monotonic()
        tracker.close("FAILED")
        assert time.monotonic() - started < 60  # ~4 s; loose for a loaded machine, under MLflow's retries
        assert Spool(tmp_path).pending() >= 1
    finally:
        server.thaw()
    assert sync_spool(tmp_path) == 0
    client = MlflowClient(server.uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    assert history(client, tracker.run_id)["train/loss"] == [(1, 2.0), (2, 1.0)]


@pytest.mark.slow
def test_server_lost_mid_run_then_synced(tmp_path, server, splits):
    """The server fails twice. First it hangs (SIGSTOP) and comes back mid-run: the tracker sends
    what it kept itself. Then it dies (SIGKILL) and is still down at the end: `sync_spool` sends the
    rest after a restart. Training never waits, and the run then holds the same metric history as
    an undisturbed one, and everything else."""
    train, test = splits
    example = to_inputs(test.images[:2], DataConfig(resize=28))
    net = NiN(TINY).eval()

    calm = make_tracker(config(server.uri, "undisturbed"), INFO, tmp_path / "calm", None, {})
    for step in range(1, 13):
        calm.log_metrics(step_metrics(step), step)
    calm.close()

    run_dir = tmp_path / "run"
    tracker = MLflowTracker(config(server.uri, "disturbed", timeout_s=2.0), INFO, run_dir, None, {}, retry_s=0.5)
    tracker.log_datasets(train, test)
    stamps = {}  # step -> (ms before the call, ms after it)

    def log(steps):
        for step in steps:
            before = int(time.time() * 1000)
            tracker.log_metrics(step_metrics(step), step)
            stamps[step] = (before, time.time() * 1000)

    client = MlflowClient(server.uri)
    log(range(1, 4))
    wait_for(lambda: len(client.get_metric_history(tracker.run_id, "train/loss")) == 3, "steps 1-3 sent")
    server.freeze()
    started = time.monotonic()
    log(range(4, 7))  # never raises, never waits on the network
    assert time.monotonic() - started < 2.0  # a call that waited would take a request timeout (2 s) at least
    wait_for(lambda: Spool(run_dir).pending() >= 3, "records kept while the server hangs")

    server.thaw()  # it also finishes the request the tracker gave up on: a duplicate MLflow ignores
    time.sleep(0.6)  # past retry_s: the next record makes the sender look again
    log([7])
    wait_for(lambda: 7 in [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")],
             "the tracker sends what it kept once the server is back")
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == list(range(1, 8))
    assert not Spool(run_dir).pending()

    server.kill()
    try:
        log(range(8, 13))
        (run_dir / "metrics.json").write_text('{"test_acc": 0.5}\n')
        tracker.log_artifact_file(run_dir / "metrics.json")
        tracker.log_test_predictions(test, test.labels)
        tracker.log_model(net, test.images[:2])
        closing, closing_ms = time.monotonic(), int(time.time() * 1000)
        tracker.close("FINISHED")
        assert time.monotonic() - closing < 30
        assert Spool(run_dir).pending() == 5 + 4 + 1  # metric steps 8-12, 2 artifacts and the 2 models, the end
    finally:
        server.start()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and 8 not in [s for s, _ in history(client, tracker.run_id)["train/loss"]]
    assert sync_spool(run_dir) == 0
    assert not (run_dir / SPOOL_DIR).exists()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, tracker.run_id) == history(client, calm.run_id)
    for m in client.get_metric_history(tracker.run_id, "train/loss"):
        before, after = stamps[m.step]
        assert before <= m.timestamp <= after, "replayed metrics keep their original timestamps"
    assert closing_ms <= run.info.end_time <= closing_ms + 1000, "the end is close()'s time, not the sync's"
    assert {i.dataset.digest for i in run.inputs.dataset_inputs} == {train.digest, test.digest}
    assert artifact_paths(client, tracker.run_id) == {"metrics.json"} | {f"predictions/{f}" for f in PREDICTION_FILES}
    with torch.no_grad():
        torch.testing.assert_close(logged_model(server.uri, tracker.run_id)(example), net(example))
