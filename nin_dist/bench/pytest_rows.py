"""A pytest plugin: one JSON line per test outcome as it happens, to the file $NIN_PYTEST_ROWS.

    NIN_PYTEST_ROWS=DIR/pytest.jsonl pytest -p nin_dist.bench.pytest_rows ...

pytest's JUnit XML is written at the end of the session, so a run killed at its time limit leaves
none; these rows are flushed one by one and survive the kill. Under --collect-only each collected
test gets a row "collected".
"""

from __future__ import annotations

import os

from nin_dist.bench.rows import RowWriter

_writer: RowWriter | None = None


def pytest_configure(config) -> None:
    global _writer
    path = os.environ.get("NIN_PYTEST_ROWS")
    _writer = RowWriter(path, kind="test") if path else None


def pytest_collection_finish(session) -> None:
    # session.items: what is left after -m/-k deselection, which runs after each item is collected
    if _writer is not None and session.config.option.collectonly:
        for item in session.items:
            _writer.write(test=item.nodeid, outcome="collected")


def pytest_runtest_logreport(report) -> None:
    # the call's outcome; a setup's only when it failed or skipped (the call then never runs), a
    # teardown's only when it failed
    if _writer is None or not (report.when == "call" or (report.when == "setup" and not report.passed)
                               or (report.when == "teardown" and report.failed)):
        return
    row = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
           "seconds": round(report.duration, 3)}
    if report.failed:
        row["message"] = str(report.longrepr)[-2000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["message"] = report.longrepr[2]
    _writer.write(**row)
