"""Where the study lives, and what every kind of storage gives the workers that share it.

Which storage (`resolve`): `--storage URL`, else `$NIN_SWEEP_STORAGE` (so a password need never be
on a command line; PostgreSQL's own `PGPASSWORD` and `~/.pgpass` work too, the URL then holds
none), else an sqlite study the sweep made before (`optuna.db` beside an sqlite MLflow store, or in
the sweep folder) when it holds this study, else the journal file `<sweep folder>/optuna.journal`
(Optuna's JournalStorage: several processes of one machine append to it under a file lock, where
sqlite answers "database is locked").

Three things the workers need beyond Optuna's storage API:

- `claim()`: one short lock per study, held while a worker creates the study, makes the parent run,
  or takes a trial (a new number while fewer than `--trials` exist, or a stale one), so `--trials N`
  is exactly N and no trial is taken twice. A file lock beside a file storage; an advisory lock
  (PostgreSQL `pg_advisory_lock`, MySQL `GET_LOCK`) in a database, which also keeps the first workers
  from creating Optuna's tables at once (optuna#1092). No worker holds it while a trial trains.
- Heartbeats: a worker writes the time into its running trial (system attr `nin.heartbeat`) every
  `--heartbeat` seconds. JournalStorage has no heartbeat in Optuna 5, and RDBStorage's fails a stale
  trial, while a sweep takes it over in place; so one mechanism for every storage. A trial is stale
  when its beat has not changed for `--grace` seconds *by the observer's own clock* (no clock of two
  machines is compared), or has none at all (left by a sweep before heartbeats).
- `shown`: the URL with its password as ***, for the screen, logs and MLflow tags.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

from nin_dist.errors import ConfigError, UserError
from nin_dist.tracking.redaction import redact_error, redact_uri, secret_values

ENV = "NIN_SWEEP_STORAGE"
JOURNAL = "optuna.journal"
SQLITE_DB = "optuna.db"  # the storage of sweeps before the journal (still taken up)
BEAT = "nin.heartbeat"  # trial system attr: the owner's last beat (time.time())
OWNER = "nin.worker"  # trial system attr: host:pid:worker of the worker running the trial
# Driver modules SQLAlchemy imports for a URL's dialect, and the package a user installs for each.
DRIVERS = {"psycopg": "psycopg[binary]", "psycopg2": "psycopg2-binary", "pymysql": "PyMySQL",
           "MySQLdb": "mysqlclient", "asyncpg": "asyncpg"}


class StorageError(UserError):
    """The study's storage cannot be used: no driver, not reachable, or not shareable as asked."""


def resolve(flag: str | None, folder: Path, tracking_uri: str, name: str) -> str:
    """The storage URL (see the module doc); `journal:<path>` for the journal file."""
    if flag or os.environ.get(ENV):
        return flag or os.environ[ENV]
    olds = [Path(folder) / SQLITE_DB]
    if tracking_uri.startswith("sqlite:///"):
        olds.insert(0, Path(tracking_uri[len("sqlite:///"):]).parent / SQLITE_DB)
    for old in olds:
        if old.is_file() and _holds(f"sqlite:///{old.resolve()}", name):
            return f"sqlite:///{old.resolve()}"
    return f"journal:{Path(folder).resolve() / JOURNAL}"


def _holds(url: str, name: str) -> bool:
    import optuna

    return name in {s.study_name for s in optuna.get_all_study_summaries(url)}


class Storage:
    """An opened storage: `optuna` (Optuna's storage object), `claim()`, `beat()`, `stale()`."""

    def __init__(self, url: str, timeout_s: float):
        self.url, self.timeout_s = url, timeout_s
        self.kind = "journal" if url.startswith("journal:") else urlsplit(url).scheme.partition("+")[0]
        self.shown = url[len("journal:"):] if self.kind == "journal" else redact_uri(url)
        self._engine = None
        self._seen: dict[int, tuple[object, float]] = {}  # trial id -> (its beat, when this process saw it change)
        if self.kind == "journal":
            self.path = Path(url[len("journal:"):])
        elif self.kind == "sqlite":
            self.path = Path(urlsplit(url).path[1:])
        elif self.kind not in ("postgresql", "mysql"):
            raise ConfigError(f"--storage {self.shown} is not allowed: postgresql://, mysql:// or sqlite:/// "
                              f"(default: a journal file in the sweep folder)")
        else:
            self.path = None
            self._engine = self._connect()
        self.optuna = None

    @property
    def shared_by_hosts(self) -> bool:
        """Whether workers on several machines can share it (a database server)."""
        return self.path is None

    def check_workers(self, workers: int) -> None:
        """sqlite answers "database is locked" to concurrent writers: it takes one worker."""
        if self.kind == "sqlite" and workers > 1:
            raise StorageError(f"--workers {workers} is not allowed with the sqlite study {self.shown}: sqlite takes "
                               f"one worker; run several on a new --study (a journal file) or --storage "
                               f"postgresql+psycopg://")

    def _connect(self):
        """A SQLAlchemy engine for the advisory lock, checked to answer within `timeout_s`."""
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool,
                                              connect_args={"connect_timeout": max(2, int(self.timeout_s))})
        except ModuleNotFoundError as err:
            package = DRIVERS.get(err.name or "", err.name)
            raise StorageError(f"--storage {self.shown} needs the driver {err.name}, which is not installed: "
                               f"pip install '{package}'") from None
        except Exception as err:  # a malformed URL (sqlalchemy.exc.ArgumentError), an unknown dialect
            raise StorageError(f"--storage {self.shown} is not a storage URL SQLAlchemy can use: "
                               f"{redact_error(err, secret_values((self.url,)))}") from None
        try:
            with engine.connect():
                pass
        except Exception as err:
            raise StorageError(f"--storage {self.shown} cannot be reached: "
                               f"{redact_error(err, secret_values((self.url,)))}") from None
        return engine

    def open(self):
        """Optuna's storage object for this URL (the tables made under the claim lock)."""
        import optuna

        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

            self.path.parent.mkdir(parents=True, exist_ok=True)
            # The open-lock (O_EXCL on a lock file) works where flock does not: NFS shared by several hosts.
            backend = JournalFileBackend(str(self.path), lock_obj=JournalFileOpenLock(str(self.path)))
            self.optuna = JournalStorage(backend)
        else:
            kwargs = {"connect_args": {"connect_timeout": max(2, int(self.timeout_s))}} if self._engine else {}
            with self.claim("tables"):
                self.optuna = optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)
        return self.optuna

    @contextlib.contextmanager
    def claim(self, name: str):
        """Hold the claim lock of study `name` (see the module doc) for the block."""
        if self._engine is None:
            lock = self.path.parent / f"{self.path.name}.{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with open(lock, "a") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
        import sqlalchemy

        key = zlib.crc32(f"nin-sweep:{name}".encode())  # an advisory lock is a number (PostgreSQL) or a name
        with self._engine.connect() as conn:
            if self.kind == "postgresql":
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            else:
                conn.execute(sqlalchemy.text("SELECT GET_LOCK(:k, -1)"), {"k": f"nin-sweep-{key}"})
            try:
                yield
            finally:
                if self.kind == "postgresql":
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                else:
                    conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:k)"), {"k": f"nin-sweep-{key}"})
                conn.commit()

    def beat(self, trial_id: int, owner: str | None = None) -> None:
        """The trial's heartbeat now (and its owner, when taking it)."""
        if owner is not None:
            self.optuna.set_trial_system_attr(trial_id, OWNER, owner)
        self.optuna.set_trial_system_attr(trial_id, BEAT, time.time())

    def stale(self, trial, grace_s: float) -> bool:
        """Whether the RUNNING `trial` (a FrozenTrial) has had no beat for `grace_s` seconds."""
        beat = trial.system_attrs.get(BEAT)
        if beat is None:
            return True
        now = time.monotonic()
        seen = self._seen.get(trial._trial_id)
        if seen is None or seen[0] != beat:
            self._seen[trial._trial_id] = (beat, now)
            return False
        return now - seen[1] > grace_s


def owner_of(trial) -> str | None:
    return trial.system_attrs.get(OWNER)
