"""A real PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary folder,
on one address and a free port, a superuser with a password; removed at the end.

initdb refuses to run as root, so as root the server runs as the `postgres` user (`runuser`); as
anyone else, as that user. Without PostgreSQL's binaries the tests that need it skip, saying why.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

USER = "nin"
PASSWORD = "pg-4f1d-secret"  # searched for in the tests' output, files and argv: it must appear nowhere


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class Postgres:
    """A running PostgreSQL cluster: `url(db)` without a password (it comes from PGPASSWORD or ~/.pgpass)."""

    def __init__(self, host: str, port: int, prefix: tuple[str, ...] = ()):
        """`prefix`: what runs each server command where the server lives (e.g. `ip netns exec NS`)."""
        self.host, self.port, self.prefix = host, port, list(prefix)
        self.bin = binaries()
        if self.bin is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user and shutil.which("runuser") is None:
            pytest.skip("as root, PostgreSQL must run as the postgres user, and runuser is missing")
        self.root = Path(tempfile.mkdtemp(prefix="nin-pg-"))  # not under pytest's folder: postgres must enter it
        self.proc: subprocess.Popen | None = None

    def _chown(self, path: Path) -> None:
        if self.as_user:
            shutil.chown(path, "postgres", "postgres")

    def start(self, timeout_s: float = 120) -> None:
        data, secret = self.root / "data", self.root / "pwfile"
        secret.write_text(PASSWORD + "\n")
        self._chown(self.root)
        self._chown(secret)
        run_as = [*self.prefix, *self.as_user]
        subprocess.run([*run_as, str(self.bin / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(secret),
                        "--auth=scram-sha-256", "--no-sync", "--no-instructions"], check=True, capture_output=True,
                       timeout=timeout_s)
        secret.unlink()
        # initdb lets in loopback only; the server also serves other hosts of a test network (password required).
        with open(data / "pg_hba.conf", "a") as hba:
            hba.write("host all all 0.0.0.0/0 scram-sha-256\n")
        # Durability off: a test cluster lives minutes, and fsyncs are slow on a loaded disk.
        self.proc = subprocess.Popen(
            [*run_as, str(self.bin / "postgres"), "-D", str(data), "-p", str(self.port), "-k", str(self.root),
             "-c", f"listen_addresses={self.host}", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=200"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        ready = [*self.prefix, str(self.bin / "pg_isready"), "-h", self.host, "-p", str(self.port), "-q"]
        while subprocess.run(ready).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def create_db(self, name: str) -> str:
        done = subprocess.run([*self.prefix, str(self.bin / "createdb"), "-h", self.host, "-p", str(self.port), "-U",
                               USER, name], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PGPASSWORD": PASSWORD})
        assert done.returncode == 0, f"createdb {name}: {done.stderr}"
        return self.url(name)

    def url(self, db: str, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{USER}@{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
