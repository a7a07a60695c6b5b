"""The MLflow UI in a real browser: a sweep's runs as a user sees them on launch/mlflow-server.sh.

The server is the real one (tests/tracking/mlflow_server.py); the browser is Debian's headless
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
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from browser import install_chromium, render, visible_text
from helpers import CPU_CONFIG, env, finish, start
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

EXPERIMENT = "nin-ui-sweep"
METRIC = "test/acc"
TRIALS = 2
# One epoch of 2 steps on a tenth-width NiN, logged to the server: about 20 s, most of it imports.
TINY_TRAIN = ["data.train_limit=256", "data.test_limit=256", "train.batch_size=128", "train.epochs=1",
              "train.threads=1", "train.progress=false", "model.width=0.1", "tracking.system_metrics=false",
              "tracking.log_model=false", f"tracking.experiment={EXPERIMENT}"]


@dataclass(frozen=True)
class RunRef:
    run_id: str
    name: str
    test_acc: float


@dataclass(frozen=True)
class Sweep:
    experiment_id: str
    parent: RunRef
    children: list[RunRef]


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
def server_uri(server) -> str:
    return server.uri


def _train_trial(uri: str, name: str, seed: int, folder: Path) -> subprocess.Popen:
    args = ["--config", str(CPU_CONFIG), *TINY_TRAIN, f"tracking.uri={uri}", f"run.name={name}", f"seed={seed}",
            f"run.out_dir={folder / name}"]
    return start([sys.executable, "-m", "nin_dist.train", *args], cwd=folder, env=env(OMP_WAIT_POLICY="PASSIVE"))


@pytest.fixture(scope="module")
def sweep_runs(server_uri: str, tmp_path_factory) -> Sweep:
    """The sweep the UI is checked on, logged to the server at `server_uri`: this fixture is where it is made.

    A parent run ("sweep-ui", created first and finished last, as a sweep does) and TRIALS child runs,
    each a real `nin-train` subprocess of its own seed logged to the server, tagged
    `mlflow.parentRunId` = the parent (nin-train cannot be told its parent, so the tag is set with
    MlflowClient once it has finished). The parent logs the best child's `test/acc`. Once `nin-sweep`
    exists this fixture runs it instead and reads the same runs back.
    """
    folder = tmp_path_factory.mktemp("sweep")
    client = MlflowClient(server_uri)
    experiment_id = client.create_experiment(EXPERIMENT)
    parent = client.create_run(experiment_id, run_name="sweep-ui")
    parent_id = parent.info.run_id
    names = [f"sweep-ui-trial-{seed}" for seed in range(TRIALS)]
    jobs = [_train_trial(server_uri, name, seed, folder) for seed, name in enumerate(names)]  # side by side
    children = []
    for name, job in zip(names, jobs, strict=True):
        code, out = finish(job, timeout=240)
        assert code == 0, f"nin-train {name} exited {code}:\n{out[-4000:]}"
        run_id = json.loads((folder / name / "metrics.json").read_text())["mlflow_run_id"]
        client.set_tag(run_id, "mlflow.parentRunId", parent_id)
        run = client.get_run(run_id)
        assert run.info.run_name == name and run.info.status == "FINISHED"
        children.append(RunRef(run_id, name, run.data.metrics[METRIC]))
    best = max(child.test_acc for child in children)
    client.log_metric(parent_id, METRIC, best)
    client.set_terminated(parent_id)
    assert client.get_run(parent_id).data.metrics[METRIC] == best
    return Sweep(experiment_id, RunRef(parent_id, "sweep-ui", best), children)


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
    assert metric_shown(texts, METRIC) == js_number(parent.test_acc)
    assert sorted(listed_after(texts, "Child runs", TRIALS)) == sorted(child.name for child in sweep_runs.children)


def test_child_run_page_shows_its_name_test_acc_and_parent(chromium, server_uri, sweep_runs, tmp_path):
    child = sweep_runs.children[-1]
    texts = render(chromium, run_page(server_uri, sweep_runs, child), tmp_path, until=child.name)
    assert f"Run {child.run_id} - MLflow" in texts
    assert metric_shown(texts, METRIC) == js_number(child.test_acc)
    assert listed_after(texts, "Parent run", 1) == [sweep_runs.parent.name]


def test_visible_text_leaves_out_scripts_and_empty_nodes():
    html = "<p> a </p><script>var b = 1;</script><noscript>c</noscript><div>\n</div><span>d</span>"
    assert visible_text(html) == ["a", "d"]
