"""`nin-bench gpu`: its commands stay valid between GPU machines, its plan fits a visit, a killed step
keeps its rows, and it runs with MLflow unimportable.

The GPU image has no MLflow, so the dry run here starts in a subprocess whose PYTHONPATH begins with
a folder holding an `mlflow` package that raises ImportError; the steps inherit it. `.ci/run` runs
the whole dry run the same way; this file covers the parts that take seconds.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nin_dist.bench import gpu, peaks
from nin_dist.bench.rows import read_rows
from nin_dist.config import load_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def without_mlflow(tmp_path) -> dict[str, str]:
    """An environment in which `import mlflow` raises ImportError, as on the GPU image."""
    blocker = tmp_path / "no-mlflow" / "mlflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("mlflow is not installed here")\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), str(REPO)])
    return env


def _all_steps(dry_run: bool) -> list:
    return [s for visit in (1, 2) for s in gpu.visit_steps(Path("/x"), visit, dry_run)]


def test_the_gpu_runs_benchmark_arguments_parse():
    """Every `nin-bench` step of the real (GPU) run has arguments its benchmark accepts."""
    steps = _all_steps(dry_run=False) + [gpu.tta_step(Path("/x"), 0, False, 60)]
    bench_steps = [s for s in steps if s.argv[0] == "nin_dist.bench"]
    assert {s.name for s in bench_steps} == {"kernels-compile", "train-compile", "train-triton", "tta-seed0"}
    for step in bench_steps:
        gpu.parse_bench_args(step.argv[1:])
    with pytest.raises(ValueError, match="--no-such-flag"):
        gpu.parse_bench_args(["kernels", "--no-such-flag"])


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_training_steps_are_valid_runs(dry_run):
    """Every `nin-train` step's config and overrides load (the profile step's window among them); .ci/run
    runs the whole dry run, profile step included."""
    steps = [s for s in _all_steps(dry_run) if s.argv[0] == "nin_dist.train"]
    assert {s.name for s in steps} == {"profile", "d2l"}
    for step in steps:
        config = step.argv[step.argv.index("--config") + 1]
        cfg = load_config(REPO / config, [a for a in step.argv[3:] if "=" in a])
        if step.name == "profile":
            assert cfg.train.profile_steps >= 1 and not cfg.train.compile and not cfg.tracking.enabled


@pytest.mark.parametrize("visit", [1, 2])
def test_each_visits_plan_fits_one_call_and_one_visit(visit):
    """A visit is one call: its steps' limits sum within the call's 10 minutes (a minute left for start-up
    and the summary), and with the machine's start within the visit's 15; the tests come first."""
    plan = gpu.planned_s(visit)
    assert sum(plan.values()) <= gpu.TOTAL_S <= gpu.CALL_LIMIT_S - 60
    assert gpu.TOTAL_S + gpu.MACHINE_START_S <= gpu.VISIT_LIMIT_S == 15 * 60
    assert all(s > 0 for s in plan.values())
    assert list(plan)[0] == ("kernel-tests" if visit == 1 else "kernels-compile")


@pytest.mark.parametrize(("name", "card", "bf16", "hbm"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM5", 989.5, 3.35),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 2.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 3.9),
    ("NVIDIA H200", "H200 SXM", 989.5, 4.8),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 4.8),
])
def test_peaks_are_the_named_cards(name, card, bf16, hbm):
    found = peaks.lookup(name)
    assert (found.card, found.bf16_tflops, found.hbm_tbps) == (card, bf16, hbm)


def test_an_unknown_card_gets_no_peaks():
    assert peaks.lookup("NVIDIA A100-SXM4-80GB") is None
    described = peaks.describe("NVIDIA A100-SXM4-80GB")
    assert described["peaks"] is None and "unknown card" in described["peaks_note"]


def _processes_naming(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_dry_run_killed_mid_step_keeps_the_rows_it_wrote(tmp_path, without_mlflow):
    """SIGKILL to the real dry run once the kernel step has timed its first rows: every row written
    before the kill is on disk and whole, and the step's process died with the command."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "nin_dist.bench", "gpu", "--dry-run", "--out", str(out),
                             "--steps", "kernels"], cwd=REPO, env=without_mlflow, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    rows_path = out / "kernels.jsonl"
    try:
        deadline = time.monotonic() + 240
        while not any(r["kind"] == "time" for r in read_rows(rows_path)):
            assert proc.poll() is None and time.monotonic() < deadline, "no timed row before the step ended"
            time.sleep(0.05)
        seen = len(read_rows(rows_path))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    deadline = time.monotonic() + 10
    while _processes_naming(str(out)):  # the step dies with its parent (PR_SET_PDEATHSIG)
        assert time.monotonic() < deadline, "the kernel step outlived the killed command"
        time.sleep(0.1)
    rows = read_rows(rows_path)
    assert len(rows) == len(rows_path.read_text().splitlines()) >= seen  # every line whole
    kinds = [r["kind"] for r in rows]
    assert kinds[0] == "device" and "error" in kinds and "time" in kinds and "speedup" not in kinds
    assert not (out / "summary.json").exists()  # the command itself never finished


def test_importing_the_benchmarks_imports_no_mlflow(without_mlflow):
    code = "import sys, nin_dist.bench.__main__; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=without_mlflow, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_dry_run_without_mlflow_writes_its_json(tmp_path, without_mlflow, data_root):
    out = tmp_path / "out"
    env = dict(without_mlflow, NIN_DATA_DIR=str(data_root))
    proc = subprocess.run([sys.executable, "-m", "nin_dist.bench", "gpu", "--dry-run", "--visit", "2",
                           "--out", str(out), "--steps", "kernels-compile,d2l"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"]
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["kernels-compile", "d2l"]
    assert all(s["status"] == "ok" and (out / s["log"]).exists() for s in steps.values())
    assert "needs CUDA" in steps["kernels-compile"]["note"]
    assert [r["step"] for r in read_rows(out / "steps.jsonl")] == ["kernels-compile", "d2l"]
    assert read_rows(out / "d2l.jsonl")[0]["test_acc"] == steps["d2l"]["result"]["test_acc"]
    d2l = steps["d2l"]["result"]
    assert 0.0 <= d2l["test_acc"] <= 1.0 and d2l["img_per_s"] > 0  # 3 steps: less than an epoch
    environment = json.loads((out / "environment.json").read_text())
    assert environment["versions"]["torch"] and "nvidia_smi" in environment


def test_the_test_step_streams_a_row_per_outcome(tmp_path):
    """The kernel-tests step's plugin: a row per test as it ends (pass, fail, skip, a setup error)."""
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('setup')\n"
        "def test_passes():\n    pass\n"
        "def test_fails():\n    assert 1 == 2\n"
        "def test_skips():\n    pytest.skip('no GPU')\n"
        "def test_errors(broken):\n    pass\n")
    rows_path = tmp_path / "rows.jsonl"
    env = dict(os.environ, NIN_PYTEST_ROWS=str(rows_path), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                    "-p", "nin_dist.bench.pytest_rows", str(tmp_path / "test_some.py")],
                   cwd=tmp_path, env=env, capture_output=True, timeout=120)
    outcomes = {r["test"].rpartition("::")[2]: (r["when"], r["outcome"]) for r in read_rows(rows_path)}
    assert outcomes == {"test_passes": ("call", "passed"), "test_fails": ("call", "failed"),
                        "test_skips": ("call", "skipped"), "test_errors": ("setup", "failed")}
