"""The MLflow UI in a real browser: a sweep's runs as a user sees them on launch/mlflow-server.sh.

The server is the real one (tests/tracking/mlflow_server.py), serving the store of the real sweep
that tests/tracking/test_sweep.py checks (tests/tracking/sweeps.py); the browser is Debian's headless
Chromium (tests/tracking/browser.py), apt-installed when missing; the test is skipped, saying why,
only where apt cannot install it. The UI is a React single-page app: everything checked here is
text the browser drew after running its JavaScript, not the HTML the server sent.

The references are independent of the page: the run names and `test/acc` values come from
MlflowClient, and the value is written as the UI writes numbers (JavaScript's own Number to string,
`js_number`, itself checked against Chromium).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal

import pytest
from browser import install_chromium, render, visible_text
from mlflow import MlflowClient
from mlflow_server import Server
from sweeps import TRIALS, SweepRun

pytestmark = pytest.mark.slow

METRIC = "test/acc"
BEST_METRIC = "best/test/acc"  # the sweep's parent: its best trial's test/acc


@dataclass(frozen=True)
class RunRef:
    run_id: str
    name: str
    test_acc: float


@dataclass(frozen=True)
class Sweep:
    experiment_id: str
    parent: RunRef
    children: list[RunRef]  # those that finished (a pruned trial logs no test/acc)
    child_names: list[str]  # every child, pruned ones too


def js_number(x: float) -> str:
    """`x` as JavaScript writes a number (ECMAScript Number::toString), as the MLflow UI shows a metric.

    Both languages take the shortest digits that read back as `x` (Python's repr); they differ in
    where they put the point: JavaScript drops a trailing ".0" and writes an exponent only below 1e-6
    or from 1e21 on ("1e-7", "1e+21").
    """
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    _, ints, exponent = Decimal(repr(abs(x))).normalize().as_tuple()  # no trailing zeros
    digits = "".join(map(str, ints))
    point = len(digits) + exponent  # how many of `digits` stand before the point; <= 0: zeros after it first
    if len(digits) <= point <= 21:
        text = digits + "0" * (point - len(digits))
    elif 0 < point <= 21:
        text = f"{digits[:point]}.{digits[point:]}"
    elif -6 < point <= 0:
        text = "0." + "0" * -point + digits
    else:
        e = point - 1
        text = digits[0] + (f".{digits[1:]}" if len(digits) > 1 else "") + ("e+" if e >= 0 else "e-") + str(abs(e))
    return sign + text


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium's path: asked for first, so a machine that cannot have it skips before any training."""
    return install_chromium()


@pytest.fixture(scope="module")
def server_uri(resumed_sweep: SweepRun, tmp_path_factory):
    """launch/mlflow-server.sh serving the sweep's sqlite store."""
    server = Server(tmp_path_factory.mktemp("ui-server"), backend=resumed_sweep.tracking_uri)
    server.start()
    yield server.uri
    server.kill()


@pytest.fixture(scope="module")
def sweep_runs(server_uri: str) -> Sweep:
    """The sweep's runs as the server's MlflowClient reads them: the parent (holding the best trial's
    `best/test/acc`) and the children that finished (`trial-N`, tagged `mlflow.parentRunId` by nin-train
    itself, each with its own `test/acc`; a pruned child has none)."""
    client = MlflowClient(server_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = sorted((run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda run: run.info.run_name)
    assert [run.info.run_name for run in children] == [f"trial-{n}" for n in range(TRIALS)]
    finished = [run for run in children if run.info.status == "FINISHED"]
    assert finished and parent.info.status == "FINISHED"
    assert parent.data.metrics[BEST_METRIC] == max(run.data.metrics[METRIC] for run in finished)
    return Sweep(parent.info.experiment_id,
                 RunRef(parent.info.run_id, parent.info.run_name, parent.data.metrics[BEST_METRIC]),
                 [RunRef(run.info.run_id, run.info.run_name, run.data.metrics[METRIC]) for run in finished],
                 [run.info.run_name for run in children])


def run_page(uri: str, sweep: Sweep, run: RunRef) -> str:
    return f"{uri}/#/experiments/{sweep.experiment_id}/runs/{run.run_id}"


def metric_shown(texts: list[str], key: str) -> str:
    """The value the run page's metrics table shows next to `key`."""
    assert key in texts, f"no {key} on the page: {texts}"
    return texts[texts.index(key) + 1]


def listed_after(texts: list[str], label: str, count: int) -> list[str]:
    """The `count` items the page lists after the label `label` (e.g. a run page's "Child runs"), commas left out."""
    assert label in texts, f"no {label!r} on the page: {texts}"
    items = [text for text in texts[texts.index(label) + 1:] if text != ","]
    return items[:count]


# --------------------------------------------------------------------------- tests

def test_js_number_writes_numbers_as_chromium_does(chromium, tmp_path):
    values = [0.2265625, 1 / 3, 1.0, 2.0**-30, 1e-6, 1.5e-7, 1e21, 123456789.123, 1e300, -0.5, 0.1, 100.0,
              float.fromhex("0x1.99999ap-4")]  # the last: 0.1 as a float32 widened, as torch hands it over
    page = tmp_path / "numbers.html"
    script = (f"for (const x of {json.dumps(values)}) {{ const p = document.createElement('p');"
              " p.textContent = String(x); document.body.appendChild(p); }")
    page.write_text(f"<html><body><script>{script}</script></body></html>")
    shown = render(chromium, page.as_uri(), tmp_path / "chromium", until=js_number(values[0]))
    assert shown == [js_number(x) for x in values]


def test_parent_run_page_shows_its_name_best_test_acc_and_children(chromium, server_uri, sweep_runs, tmp_path):
    parent = sweep_runs.parent
    texts = render(chromium, run_page(server_uri, sweep_runs, parent), tmp_path, until=parent.name)
    assert f"Run {parent.run_id} - MLflow" in texts  # the page's title: this run's page, not another
    assert metric_shown(texts, BEST_METRIC) == js_number(parent.test_acc)
    assert sorted(listed_after(texts, "Child runs", TRIALS)) == sweep_runs.child_names


def test_child_run_page_shows_its_name_test_acc_and_parent(chromium, server_uri, sweep_runs, tmp_path):
    child = sweep_runs.children[-1]
    texts = render(chromium, run_page(server_uri, sweep_runs, child), tmp_path, until=child.name)
    assert f"Run {child.run_id} - MLflow" in texts
    assert metric_shown(texts, METRIC) == js_number(child.test_acc)
    assert listed_after(texts, "Parent run", 1) == [sweep_runs.parent.name]


def test_visible_text_leaves_out_scripts_and_empty_nodes():
    html = "<p> a </p><script>var b = 1;</script><noscript>c</noscript><div>\n</div><span>d</span>"
    assert visible_text(html) == ["a", "d"]
