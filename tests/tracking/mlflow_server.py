"""A real MLflow tracking server for the tests: launch/mlflow-server.sh on 127.0.0.1 and a free port.

The tests stop it (SIGSTOP: it accepts connections and answers nothing, like a hung server), kill
it (SIGKILL, like a crash) and start it again on the same port and store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "launch" / "mlflow-server.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """launch/mlflow-server.sh on 127.0.0.1:<free port>, with its store and artifacts under `root`."""

    def __init__(self, root: Path, backend: str | None = None):
        """`backend`: the store to serve (default: a new sqlite file under `root`)."""
        self.root, self.port = root, free_port()
        self.backend = backend or f"sqlite:///{root}/server.db"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = os.environ | {"HOST": "127.0.0.1", "PORT": str(self.port), "WORKERS": "1",
                            "BACKEND": self.backend, "ARTIFACTS": str(self.root / "artifacts"),
                            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        with open(self.root / "server.log", "a") as log:  # the server keeps its own copy of the file
            self.proc = subprocess.Popen(["bash", str(SCRIPT)], cwd=self.root, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.kill()
        pytest.fail(f"mlflow server not up in {timeout_s} s: {(self.root / 'server.log').read_text()[-2000:]}")

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, but nothing answers (a hung server)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL to the server and its workers, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
