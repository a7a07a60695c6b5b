"""The spool: records kept in RUN_DIR/tracking-spool/ as files, and their replay (`sync`).

The files are read as they lie on disk (their format is what `nin-train --sync-tracking` of a
later version must read); replays go into a real sqlite store.
"""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from mlflow_runs import history
from mlflow_server import free_port

from nin_dist.errors import TrackingError
from nin_dist.tracking import sync as sync_spool
from nin_dist.tracking.spool import SPOOL_DIR, Spool


def metrics_record(run_id: str, step: int) -> dict:
    return {"kind": "metrics", "run_id": run_id, "step": step, "timestamp": step, "metrics": {"x/y": float(step)}}


def test_the_spool_on_disk(tmp_path):
    spool = Spool(tmp_path)
    spool.bind("http://alice:pw-4471@127.0.0.1:5000")
    folder = tmp_path / SPOOL_DIR
    assert json.loads((folder / "run.json").read_text()) == {"tracking_uri": "http://alice@127.0.0.1:5000"}
    staged = spool.stage("config.yaml")
    staged.write_text("a: 1\n")
    assert staged.parent.parent == folder / "files" and len(staged.parent.name) == 12
    record = {"kind": "artifact", "run_id": "a" * 32, "file": spool.relative(staged), "artifact_path": None}
    spool.append(record)
    spool.append(metrics_record("a" * 32, 1))
    with open(folder / "records.jsonl", "a") as f:
        f.write('{"kind": "metr')  # a line cut short by a crash mid-write
    lines = (folder / "records.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines[:2]] == [record, metrics_record("a" * 32, 1)]
    assert spool.pending() == 3, "the incomplete line waits too: a replay keeps it, never drops it"
    spool.append(metrics_record("a" * 32, 2))
    lines = (folder / "records.jsonl").read_text().splitlines()
    assert lines[2] == '{"kind": "metr' and json.loads(lines[3]) == metrics_record("a" * 32, 2), "a fresh line"
    spool.discard(record)
    assert not staged.parent.exists()


def test_records_for_another_store_are_not_mixed(tmp_path):
    spool = Spool(tmp_path)
    spool.bind("sqlite:///a.db")
    spool.append(metrics_record("a" * 32, 1))
    with pytest.raises(TrackingError, match="holds unsent MLflow records for sqlite:///a.db"):
        spool.bind("sqlite:///b.db")
    spool.bind("sqlite:///a.db")
    assert spool.pending() == 1


def test_a_replay_stopped_by_a_failure_keeps_its_progress(tmp_path, sqlite_uri):
    """Records before the failing one are sent (consecutive metrics as one batch) and counted in
    progress.json; the failing one and those after it wait for the next sync. The failure is the
    store's own: an artifact folder `x` where its artifact `x` is already a file."""
    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("nin-tests-replay")).info.run_id
    spool = Spool(tmp_path)
    spool.bind(sqlite_uri)
    first, second = spool.stage("x"), spool.stage("y")
    first.write_text("1\n")
    second.write_text("2\n")
    for record in (metrics_record(run_id, 1), metrics_record(run_id, 2),
                   {"kind": "artifact", "run_id": run_id, "file": spool.relative(first), "artifact_path": None},
                   {"kind": "artifact", "run_id": run_id, "file": spool.relative(second), "artifact_path": "x"},
                   metrics_record(run_id, 3)):
        spool.append(record)
    assert sync_spool(tmp_path) == 1
    assert json.loads((tmp_path / SPOOL_DIR / "progress.json").read_text()) == {"done": 3, "kept": []}
    assert spool.pending() == 2 and second.exists() and not first.exists()
    assert history(client, run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}


def test_progress_that_does_not_fit_replays_from_the_start(tmp_path, sqlite_uri):
    """progress.json claiming more than records.jsonl holds deletes nothing unsent: all is sent again."""
    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(client.create_experiment("nin-tests-progress")).info.run_id
    spool = Spool(tmp_path)
    spool.bind(sqlite_uri)
    spool.append(metrics_record(run_id, 1))
    spool.append(metrics_record(run_id, 2))
    (tmp_path / SPOOL_DIR / "progress.json").write_text('{"done": 99, "kept": "all"}')
    assert sync_spool(tmp_path) == 0
    assert history(client, run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}
    assert not (tmp_path / SPOOL_DIR).exists()


def test_sync_without_a_spool_and_against_a_dead_server(tmp_path):
    assert sync_spool(tmp_path) == 0
    spool = Spool(tmp_path)
    spool.bind(f"http://127.0.0.1:{free_port()}")
    spool.append(metrics_record("a" * 32, 1))
    with pytest.raises(TrackingError, match="unreachable"):
        sync_spool(tmp_path)
    assert spool.pending() == 1
