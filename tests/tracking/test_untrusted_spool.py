"""A run folder's spool as untrusted input: it reaches nothing outside itself and loses no record.

Each spool is written as a user's shared storage might hold it: paths out of the spool, symlinks
out, torn and garbage lines, a tampered model, a broken run.json. Next to it lies a `victim` folder
that must stay exactly as it was. Replays go into a real sqlite store, and are read back from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pytest
import torch
from helpers import REPO, holding
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow_runs import TINY, artifact_paths, history

from nin_dist.config import DataConfig
from nin_dist.data import to_inputs
from nin_dist.errors import RunDirError, TrackingError
from nin_dist.model import NiN
from nin_dist.tracking import sync as sync_spool
from nin_dist.tracking.saved_model import save_model, save_network
from nin_dist.tracking.spool import Spool


def metrics_record(run_id: str, step: int) -> dict:
    return {"kind": "metrics", "run_id": run_id, "step": step, "timestamp": step, "metrics": {"x/y": float(step)}}


def artifact_record(run_id: str, file: str, artifact_path: str | None = None) -> dict:
    return {"kind": "artifact", "run_id": run_id, "file": file, "artifact_path": artifact_path}


def tree(folder: Path) -> dict[str, bytes | str]:
    """Everything under `folder` (symlinks as their targets, never followed): path -> bytes | "dir" | "->t"."""
    out: dict[str, bytes | str] = {}
    for top, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = Path(top) / name
            key = str(path.relative_to(folder))
            out[key] = (f"->{os.readlink(path)}" if path.is_symlink() else "dir" if path.is_dir()
                        else path.read_bytes())
    return out


def lines(spool: Spool) -> list[bytes]:
    return spool.records_path.read_bytes().splitlines()


class Setup:
    """A run in the sqlite store, its run folder with a bound spool, and a victim folder beside it."""

    def __init__(self, root: Path, uri: str):
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name("nin-tests-untrusted")
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment("nin-tests-untrusted"))
        self.run_id = self.client.create_run(experiment_id).info.run_id
        self.run_dir = root / "run"
        self.spool = Spool(self.run_dir)
        self.spool.bind(uri)
        self.victim = root / "victim"
        (self.victim / "sub").mkdir(parents=True)
        (self.victim / "x").write_text("the victim's file\n")
        (self.victim / "sub" / "secret").write_text("not for MLflow\n")
        self.before = tree(self.victim)

    def good_artifact(self) -> dict:
        staged = self.spool.stage("good.txt")
        staged.write_text("sent\n")
        return artifact_record(self.run_id, self.spool.relative(staged))

    def victim_untouched(self) -> bool:
        return tree(self.victim) == self.before


@pytest.fixture
def setup(tmp_path, sqlite_uri) -> Setup:
    return Setup(tmp_path, sqlite_uri)


def bad_file(setup: Setup, case: str) -> str:
    """The `file` of an artifact record that leads outside the spool's files/ folder."""
    spool, victim = setup.spool, setup.victim
    if case == "dotdot":  # the spool is RUN/tracking-spool: two levels up is the victim's folder
        return "../../victim/x"
    if case == "absolute":
        return str(victim / "x")
    staged = spool.stage("leak")
    if case == "symlink-file":
        staged.symlink_to(victim / "x")
        return spool.relative(staged)
    if case == "symlink-folder":  # files/<id> itself points at the victim
        shutil.rmtree(staged.parent)
        staged.parent.symlink_to(victim)
        return spool.relative(staged.parent / "x")
    staged.mkdir()  # "symlink-inside": a staged folder holding a symlink out
    (staged / "fine.txt").write_text("ok\n")
    (staged / "secret").symlink_to(victim / "sub" / "secret")
    return spool.relative(staged)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink-file", "symlink-folder", "symlink-inside"])
def test_a_path_out_of_the_spool_is_refused_and_kept(setup, case, caplog):
    """The record is not sent and not deleted (nor what it names); the records around it are sent."""
    spool, run_id = setup.spool, setup.run_id
    bad = artifact_record(run_id, bad_file(setup, case), "leak")
    staged_before = tree(spool.folder / "files")
    for record in (metrics_record(run_id, 1), bad, setup.good_artifact(), metrics_record(run_id, 2)):
        spool.append(record)
    with caplog.at_level(logging.WARNING, logger="nin_dist.tracking"):
        assert sync_spool(setup.run_dir) == 1
    assert setup.victim_untouched()
    assert history(setup.client, run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}
    assert artifact_paths(setup.client, run_id) == {"good.txt"}, "nothing of the victim's is uploaded"
    assert [json.loads(line) for line in lines(spool)] == [bad], "the refused record is kept"
    kept = [r for r in caplog.records if "kept, not sent" in r.getMessage()]
    assert len(kept) == 1 and "outside" in kept[0].getMessage(), [r.getMessage() for r in caplog.records]
    left = tree(spool.folder / "files")
    assert all(left.get(k) == v for k, v in staged_before.items()), "the refused record's files stay"
    assert sync_spool(setup.run_dir) == 1 and [json.loads(line) for line in lines(spool)] == [bad]
    assert setup.victim_untouched()


def test_a_torn_line_then_an_append(setup):
    """A crash mid-append leaves a line without its newline: the next record starts a line of its
    own, so only the torn one is not sent (and it is kept)."""
    spool, run_id = setup.spool, setup.run_id
    spool.append(metrics_record(run_id, 1))
    with open(spool.records_path, "a") as f:
        f.write('{"kind": "metrics", "run_id": "' + run_id[:9])  # cut short
    spool.append(metrics_record(run_id, 2))
    spool.append(setup.good_artifact())
    assert sync_spool(setup.run_dir) == 1
    assert history(setup.client, run_id) == {"x/y": [(1, 1.0), (2, 2.0)]}
    assert artifact_paths(setup.client, run_id) == {"good.txt"}
    assert lines(spool) == [('{"kind": "metrics", "run_id": "' + run_id[:9]).encode()]
    assert setup.victim_untouched()


GARBAGE = [
    b"not json at all",
    b"\xff\xfe\x00 not utf-8",
    b"[" * 100_000 + b"]" * 100_000,  # valid JSON too deep to parse
    b"[1, 2, 3]",
    b'"a string"',
    b"null",
    b'{"kind": "bogus", "run_id": "abc"}',
    b'{"kind": ["not", "a", "name"], "run_id": "abc"}',
    b'{"kind": "metrics", "run_id": "abc"}',
    b'{"kind": "metrics", "run_id": "abc", "step": true, "timestamp": 1, "metrics": {}}',
    b'{"kind": "metrics", "run_id": "abc", "step": 1, "timestamp": 1, "metrics": {"x": "1"}}',
    b'{"kind": "terminate", "run_id": "abc", "status": "FINISHED", "end_time": 100000000000000000000}',
    b'{"kind": "artifact", "run_id": "abc", "file": 5, "artifact_path": null}',
    b'{"kind": "inputs", "run_id": "abc", "datasets": [{"dataset": {"name": "n"}, "context": "training"}]}',
    b'{"kind": "model", "run_id": "abc", "file": "files/nothere/model", "name": "model"}',
]


def test_a_spool_of_garbage_is_kept_whole(setup, caplog):
    """Every line is skipped with one warning; the spool stays as it was and the exit is 1."""
    spool = setup.spool
    spool.records_path.write_bytes(b"\n".join(GARBAGE) + b"\n")
    with caplog.at_level(logging.WARNING, logger="nin_dist.tracking"):
        assert sync_spool(setup.run_dir) == 1
    assert lines(spool) == GARBAGE
    assert len([r for r in caplog.records if "kept, not sent" in r.getMessage()]) == len(GARBAGE)
    assert spool.pending() == len(GARBAGE) and setup.victim_untouched()
    assert sync_spool(setup.run_dir) == 1 and lines(spool) == GARBAGE


def test_poison_records_among_good_ones(setup):
    """Later records are still sent, the poison ones stay (in order), and a second sync sends
    nothing twice and keeps them still."""
    spool, run_id = setup.spool, setup.run_id
    poison = [b"{not json", b"[1, 2]", b'{"kind": "unknown", "run_id": "' + run_id.encode() + b'"}']
    spool.append(metrics_record(run_id, 1))
    with open(spool.records_path, "ab") as f:
        f.write(b"\n".join(poison[:2]) + b"\n")
    spool.append(setup.good_artifact())
    spool.append(metrics_record(run_id, 2))
    with open(spool.records_path, "ab") as f:
        f.write(poison[2] + b"\n")
    spool.append(metrics_record(run_id, 3))
    spool.append({"kind": "terminate", "run_id": run_id, "status": "FINISHED", "end_time": 1_000})
    assert sync_spool(setup.run_dir) == 1
    run = setup.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == 1_000
    assert history(setup.client, run_id) == {"x/y": [(1, 1.0), (2, 2.0), (3, 3.0)]}
    assert artifact_paths(setup.client, run_id) == {"good.txt"}
    assert lines(spool) == poison
    assert sync_spool(setup.run_dir) == 1 and lines(spool) == poison
    assert history(setup.client, run_id) == {"x/y": [(1, 1.0), (2, 2.0), (3, 3.0)]}


def test_spool_files_are_never_followed_as_symlinks(setup):
    """records.jsonl pointing at the victim's file is neither read nor appended to."""
    spool = setup.spool
    spool.records_path.symlink_to(setup.victim / "x")
    with pytest.raises(TrackingError, match="symlink is never followed"):
        sync_spool(setup.run_dir)
    with pytest.raises(OSError):
        spool.append(metrics_record(setup.run_id, 1))
    assert setup.victim_untouched()


@pytest.mark.parametrize("meta", ['{"tracking_uri": 5}', '{"tracking_uri": ""}', '["sqlite:///x.db"]',
                                  "{not json", '{"uri": "sqlite:///x.db"}'])
def test_a_run_json_without_a_uri_is_a_user_error(setup, meta):
    setup.spool.append(metrics_record(setup.run_id, 1))
    setup.spool.meta_path.write_text(meta)
    with pytest.raises(TrackingError, match="run.json is not"):
        sync_spool(setup.run_dir)
    assert setup.spool.pending() == 1


def test_the_cli_says_so_in_one_line(setup):
    setup.spool.append(metrics_record(setup.run_id, 1))
    setup.spool.meta_path.write_text('{"tracking_uri": 5}')
    proc = subprocess.run([sys.executable, "-m", "nin_dist.train", "--sync-tracking", str(setup.run_dir)],
                          cwd=setup.run_dir, capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("nin-train: error: ") and "run.json" in errors[0], errors


class Listener:
    """A TCP port on 127.0.0.1 that counts the connections made to it (the collector a tampered run.json names)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("home", [None, "http://mlflow.example.org:5000"])
def test_a_run_json_naming_another_server_gets_no_credentials(setup, monkeypatch, home):
    collector = Listener()
    try:
        setup.spool.append(metrics_record(setup.run_id, 1))
        setup.spool.meta_path.write_text(json.dumps({"tracking_uri": collector.url}))
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-tracking-pw")
        if home:
            monkeypatch.setenv("MLFLOW_TRACKING_URI", home)
        with pytest.raises(TrackingError, match="a run folder may not choose where they go") as raised:
            sync_spool(setup.run_dir)
        assert "hunter2" not in str(raised.value)
        assert collector.connections == 0  # refused before a single connection was opened
        assert setup.spool.pending() == 1
    finally:
        collector.close()


def test_the_server_the_environment_names_is_trusted(setup, monkeypatch):
    collector = Listener()  # it closes every connection: the store "does not answer", after the check passed
    try:
        setup.spool.append(metrics_record(setup.run_id, 1))
        setup.spool.meta_path.write_text(json.dumps({"tracking_uri": collector.url}))
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-3f9a8c1e77")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", collector.url.replace("http://", "HTTP://") + "/")
        with pytest.raises(TrackingError) as raised:
            sync_spool(setup.run_dir)
        assert "may not choose" not in str(raised.value) and "unreachable" in str(raised.value)
        assert collector.connections >= 1
    finally:
        collector.close()


def test_a_sync_waits_for_no_one_while_the_run_folder_is_held(setup):
    setup.spool.append(metrics_record(setup.run_id, 1))
    with holding(setup.run_dir) as holder:
        with pytest.raises(RunDirError, match=f"in use by another job \\(pid {holder.pid} "):
            sync_spool(setup.run_dir)
    assert setup.spool.pending() == 1
    assert sync_spool(setup.run_dir) == 0 and setup.spool.pending() == 0  # free again: it goes through


# ---- models: sent as their files, never loaded


class RunsCodeWhenUnpickled:
    """Unpickling this creates the file `marker`: a stand-in for any code a pickle may run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def tamper(model_folder: Path, into: Path, marker: Path) -> Path:
    """A copy of a saved MLflow pytorch model whose weights are a pickle that runs code."""
    shutil.copytree(model_folder, into)
    (into / "data" / "model.pt2").unlink()
    torch.save(RunsCodeWhenUnpickled(marker), into / "data" / "model.pth")
    (into / "data" / "pickle_module_info.txt").write_text("pickle")
    return into


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(a tiny network, an example input, the served model and the plain network nin-train saves for it)."""
    torch.manual_seed(0)
    net = NiN(TINY).eval()
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    folder = tmp_path_factory.mktemp("saved")
    save_model(net, images, DataConfig(resize=28), False, folder / "model")
    save_network(net, images, DataConfig(resize=28), folder / "network")
    return net, to_inputs(images, DataConfig(resize=28)), folder / "model", folder / "network"


def test_a_network_is_replayed_from_its_files_never_unpickled(setup, saved, tmp_path, sqlite_uri, caplog):
    net, example, _, folder = saved
    genuine = setup.spool.stage("network")
    shutil.copytree(folder, genuine)
    # The threat is real: loading the tampered folder runs its code.
    tamper(genuine, tmp_path / "threat", tmp_path / "marker-when-loaded")
    with contextlib.suppress(AttributeError):  # what it unpickles is no model
        mlflow.pytorch.load_model(str(tmp_path / "threat"))
    assert (tmp_path / "marker-when-loaded").exists()

    marker = tmp_path / "marker-on-replay"
    tampered = tamper(genuine, setup.spool.stage("network"), marker)
    for file, step in ((tampered, 1), (genuine, 2)):
        setup.spool.append({"kind": "model", "run_id": setup.run_id, "file": setup.spool.relative(file),
                            "name": "network", "step": step})
    with caplog.at_level(logging.WARNING, logger="nin_dist.tracking.spool"):
        assert sync_spool(setup.run_dir) == 1, "the pickle kept, not sent"
    assert not marker.exists(), "the replay unpickled the model"
    kept = [r.getMessage() for r in caplog.records if "kept, not sent" in r.getMessage()]
    assert len(kept) == 1 and "a pickle loads as code" in kept[0], kept
    outputs = {o.step: o.model_id for o in setup.client.get_run(setup.run_id).outputs.model_outputs}
    assert sorted(outputs) == [2]
    mlflow.set_tracking_uri(sqlite_uri)
    loaded = mlflow.pytorch.load_model(f"models:/{outputs[2]}")
    with torch.no_grad():
        torch.testing.assert_close(loaded(example), net(example))
    logged = setup.client.get_logged_model(outputs[2])
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == setup.run_id
    assert logged.name == "network"
    assert not marker.exists() and setup.victim_untouched()


def served_code_changed(genuine: Path, into: Path, how: str, marker: Path) -> Path:
    """A copy of a saved model whose served code is not the project's: code that creates `marker` when
    the model is loaded, as served_model.py itself, as another file the MLmodel names, or on a code path."""
    shutil.copytree(genuine, into)
    evil = f"open({str(marker)!r}, 'w')\n"
    mlmodel = (into / "MLmodel").read_text()
    if how == "replaced":
        (into / "served_model.py").write_text(evil + (into / "served_model.py").read_text())
    elif how == "renamed":
        (into / "other.py").write_text(evil + (into / "served_model.py").read_text())
        (into / "MLmodel").write_text(mlmodel.replace("served_model.py", "other.py"))
    else:  # "code path": a module of the same name as one served_model.py imports, first on sys.path
        (into / "code").mkdir()
        (into / "code" / "pandas.py").write_text(evil)
        (into / "MLmodel").write_text(mlmodel.replace("    code: null\n", "    code: code\n", 1))
    return into


def test_a_model_whose_served_code_is_not_the_projects_is_kept_not_sent(setup, saved, tmp_path, caplog, sqlite_uri):
    """Whoever loads a logged model runs its code: a replay sends only the code nin-train wrote."""
    net, example, folder, _ = saved
    marker = tmp_path / "ran"
    steps = {}
    for step, how in enumerate(("replaced", "renamed", "code path", "genuine"), start=1):
        staged = setup.spool.stage("model")
        if how == "genuine":
            shutil.copytree(folder, staged)
        else:
            served_code_changed(folder, staged, how, marker)
        setup.spool.append({"kind": "model", "run_id": setup.run_id, "file": setup.spool.relative(staged),
                            "name": "model", "step": step})
        steps[how] = step
    with caplog.at_level(logging.WARNING, logger="nin_dist.tracking.spool"):
        assert sync_spool(setup.run_dir) == 1, "three kept"
    kept = [r.getMessage() for r in caplog.records if "kept, not sent" in r.getMessage()]
    assert len(kept) == 3 and all("served_model.py" in m or "code paths" in m for m in kept), kept
    assert [json.loads(line)["step"] for line in lines(setup.spool)] == [1, 2, 3]
    outputs = setup.client.get_run(setup.run_id).outputs.model_outputs
    assert [o.step for o in outputs] == [steps["genuine"]]
    mlflow.set_tracking_uri(sqlite_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{outputs[0].model_id}")
    assert len(loaded.predict(np.zeros((1, 28, 28), dtype=np.uint8))) == 1
    assert not marker.exists() and setup.victim_untouched()
