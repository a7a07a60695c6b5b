"""Fixtures of the tracking tests: a clean MLflow environment, a scratch working folder, a sqlite
store and a real `mlflow server` (both real, never mocked), a real PostgreSQL server, and the first
images of each split."""

from __future__ import annotations

import pytest
from helpers import data_dir
from mlflow_server import Server, free_port
from postgres import Postgres
from sweeps import SweepRun, two_workers_one_killed

from nin_dist.data import load_split

MLFLOW_VARIABLES = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """Each test starts with MLflow's HTTP variables and tracking URI unset (the tracker sets the first two)."""
    for name in MLFLOW_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module", autouse=True)
def _in_a_scratch_folder(tmp_path_factory):
    """MLflow puts a sqlite store's artifacts in ./mlruns: keep them out of the repository."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; a test that stops or kills it brings it back before it ends."""
    srv = Server(tmp_path_factory.mktemp("server"))
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def splits():
    return load_split(data_dir(), "train", limit=64), load_split(data_dir(), "test", limit=50)


@pytest.fixture(scope="session")
def resumed_sweep(tmp_path_factory) -> SweepRun:
    """The real sweep of two worker processes, one killed mid-trial (tests/tracking/sweeps.py); made once,
    read by test_sweep.py and, served by a real server, by the browser test."""
    return two_workers_one_killed(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback (tests/tracking/postgres.py), started once and removed at the end;
    its password reaches the clients only through PGPASSWORD."""
    server = Postgres("127.0.0.1", free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
