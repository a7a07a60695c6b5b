"""The tracker's background sender: one thread sends records in call order, or keeps them.

The training thread only queues; it never waits on the network. The sender thread turns each
queued item into a record (rendering a report takes a second; that happens here too) and sends it.
When a send fails, the store is taken as away: this record and all that follow go to the spool
without being tried, and every `retry_s` (and at the end of the run) the sender asks the store
whether it is back. Once it is, the spool is sent first, so the run gets every record in order.

A record the store answers and rejects (HTTP 4xx), or one unfit to send (`BadRecord`), cannot
succeed later: it goes to the spool with one warning, where a replay skips it and keeps it, so it
cannot stop everything behind it and is not lost. A record that can be neither sent nor kept (the
spool cannot be written: a full disk, a folder gone read-only) is counted in `lost`, for `close`
to report in one line. MLflow's error texts are logged with their secrets and passwords as `***`.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from nin_dist.errors import TrackingError
from nin_dist.tracking.records import BadRecord, apply_record, refused
from nin_dist.tracking.redaction import redact_error, redact_uri
from nin_dist.tracking.spool import Spool
from nin_dist.tracking.store import probe

log = logging.getLogger(__name__)


class Sender:
    """Sends records with `client` to the store at `uri`, keeping in `spool` what cannot go now."""

    def __init__(self, client, uri: str, spool: Spool, timeout_s: float, retry_s: float,
                 secrets: Sequence[str] = (), on_reconnect: Callable[[], None] = lambda: None):
        self._client, self._uri, self._spool, self._secrets = client, uri, spool, list(secrets)
        self._timeout_s, self._retry_s, self._on_reconnect = timeout_s, retry_s, on_reconnect
        # Records left by an earlier process of this run go first: start as if the store were away.
        self._online = not spool.pending()
        self._last_probe = -float("inf")
        self._abandoned = False
        self._current: dict | None = None
        self._jobs_done = 0
        self.lost: Counter[str] = Counter()  # kind -> records neither sent nor kept
        self.lost_because: str | None = None  # why the first of them could not be kept
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def put(self, make_record: Callable[[], dict]) -> None:
        """Queue a function returning the record to send; it runs on the sender thread."""
        self._queue.put(make_record)

    def finish(self) -> None:
        """Send everything queued, joining the thread while it makes progress. If one request hangs
        (beyond what the HTTP timeout allows), keep it and the rest in the spool and return."""
        self._queue.put(None)
        stall_s = max(60.0, 6 * self._timeout_s)
        done, since = self._jobs_done, time.monotonic()
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)
            if self._jobs_done != done:
                done, since = self._jobs_done, time.monotonic()
            elif time.monotonic() - since > stall_s:
                log.warning("tracking: a request to %s has not returned in %.0f s; keeping the rest in %s",
                            redact_uri(self._uri), stall_s, self._spool.folder)
                self._abandon()
                return

    def _abandon(self) -> None:
        self._abandoned = True
        if self._current is not None:  # it may yet get through too: resending it is harmless
            self._keep(self._current)
        while True:
            try:
                make_record = self._queue.get_nowait()
            except queue.Empty:
                return
            record = None if make_record is None else self._prepare(make_record)
            if record is not None:
                self._keep(record)

    def _keep(self, record: dict) -> None:
        """Append to the spool; when even that fails, count the record as lost."""
        try:
            self._spool.append(record)
        except (OSError, TrackingError) as err:
            self._lose(record["kind"], err)

    def _lose(self, what: str, err: BaseException) -> None:
        self.lost[what] += 1
        if self.lost_because is None:
            self.lost_because = f"{type(err).__name__}: {redact_error(err, self._secrets)}"

    def _prepare(self, make_record: Callable[[], dict]) -> dict | None:
        """`make_record()`; None, the record counted as lost, when it fails for want of disk."""
        try:
            return make_record()
        except OSError as err:  # e.g. no room to stage a file or render a report
            self._lose("unprepared", err)
        except Exception as err:
            log.exception("tracking: a tracking call failed before it could be sent or kept")
            self._lose("unprepared", err)
        return None

    def _work(self) -> None:
        while True:
            make_record = self._queue.get()
            if make_record is None:
                return
            try:
                self._current = self._prepare(make_record)
                if self._current is not None:
                    self._deliver(self._current)
            except Exception:
                log.exception("tracking: a tracking call failed before it could be sent or kept")
            finally:
                self._current = None
                self._jobs_done += 1

    def _deliver(self, record: dict) -> None:
        if self._reachable(force=record["kind"] == "terminate"):
            try:
                apply_record(self._client, record, self._spool.folder)
                self._spool.discard(record)
                return
            except Exception as err:
                if isinstance(err, BadRecord) or refused(err):
                    why = err if isinstance(err, BadRecord) else f"the store refused it ({self._redact(err)})"
                    log.warning("tracking: a %s record is kept in %s, not sent: %s: %s", record["kind"],
                                self._spool.folder, why, json.dumps(record)[:500])
                else:
                    self._online, self._last_probe = False, time.monotonic()
                    log.warning("tracking: sending to %s failed (%s); keeping this and later records in %s and "
                                "checking every %g s whether the store is back", redact_uri(self._uri),
                                self._redact(err), self._spool.folder, self._retry_s)
        self._keep(record)

    def _redact(self, err: BaseException) -> str:
        return redact_error(err, self._secrets)

    def _reachable(self, force: bool = False) -> bool:
        """True when records can go straight to the store; on its return, sends the spool first."""
        if self._abandoned:
            return False
        if self._online:
            return True
        if not force and time.monotonic() - self._last_probe < self._retry_s:
            return False
        self._last_probe = time.monotonic()
        if not probe(self._uri, self._timeout_s):
            return False
        try:
            done = self._spool.replay(self._client, self._secrets)
        except Exception as err:
            log.warning("tracking: sending kept records failed (%s); they stay in %s", self._redact(err),
                        self._spool.folder)
            return False
        log.info("tracking: %s answers; sent %d kept records%s", redact_uri(self._uri), done.sent,
                 f" ({done.kept} unfit to send stay in {self._spool.folder})" if done.kept else "")
        self._online = True
        self._on_reconnect()
        return True
