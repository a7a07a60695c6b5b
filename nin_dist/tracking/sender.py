"""The tracker's background sender: one thread sends records in call order, or keeps them.

The training thread only queues; it never waits on the network. The sender thread turns each
queued item into a record (rendering a report takes a second; that happens here too) and sends it.
When a send fails, the store is taken as away: this record and all that follow go to the spool
without being tried, and every `retry_s` (and at the end of the run) the sender asks the store
whether it is back. Once it is, the spool is sent first, so the run gets every record in order.

A record the store answers and rejects (HTTP 4xx) cannot succeed later: it is logged and dropped
rather than kept, so it cannot stop everything behind it.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable

from nin_dist.errors import first_line
from nin_dist.tracking.records import apply_record, refused
from nin_dist.tracking.redaction import redact_uri
from nin_dist.tracking.spool import Spool
from nin_dist.tracking.store import probe

log = logging.getLogger(__name__)


class Sender:
    """Sends records with `client` to the store at `uri`, keeping in `spool` what cannot go now."""

    def __init__(self, client, uri: str, spool: Spool, timeout_s: float, retry_s: float,
                 on_reconnect: Callable[[], None] = lambda: None):
        self._client, self._uri, self._spool = client, uri, spool
        self._timeout_s, self._retry_s, self._on_reconnect = timeout_s, retry_s, on_reconnect
        # Records left by an earlier process of this run go first: start as if the store were away.
        self._online = not spool.pending()
        self._last_probe = -float("inf")
        self._abandoned = False
        self._current: dict | None = None
        self._jobs_done = 0
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
            self._spool.append(self._current)
        while True:
            try:
                make_record = self._queue.get_nowait()
            except queue.Empty:
                return
            if make_record is not None:
                self._spool.append(make_record())

    def _work(self) -> None:
        while True:
            make_record = self._queue.get()
            if make_record is None:
                return
            try:
                self._current = make_record()
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
                if refused(err):
                    log.error("tracking: the store refused a %s record (%s); dropped: %s", record["kind"],
                              first_line(err), json.dumps(record)[:500])
                    self._spool.discard(record)
                    return
                self._online, self._last_probe = False, time.monotonic()
                log.warning("tracking: sending to %s failed (%s); keeping this and later records in %s and "
                            "checking every %g s whether the store is back", redact_uri(self._uri),
                            first_line(err), self._spool.folder, self._retry_s)
        self._spool.append(record)

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
            sent = self._spool.replay(self._client)
        except Exception as err:
            log.warning("tracking: sending kept records failed (%s); %d still kept", first_line(err),
                        self._spool.pending())
            return False
        log.info("tracking: %s answers; sent %d kept records", redact_uri(self._uri), sent)
        self._online = True
        self._on_reconnect()
        return True
