"""`nin-bench gpu`: its commands stay valid between GPU machines, and it runs with MLflow unimportable.

The GPU image has no MLflow, so the dry run here starts in a subprocess whose PYTHONPATH begins with
a folder holding an `mlflow` package that raises ImportError; the steps inherit it. `.ci/run` runs
the whole dry run the same way; this file covers the parts that take seconds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nin_dist.bench import gpu
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


def test_the_gpu_runs_benchmark_arguments_parse():
    """Every `nin-bench` step of the real (GPU) run has arguments its benchmark accepts."""
    steps = gpu.build_steps(Path("/nonexistent"), dry_run=False) + [gpu.tta_step(Path("/x"), 0, False, 60)]
    bench_steps = [s for s in steps if s.argv[0] == "nin_dist.bench"]
    assert {s.name for s in bench_steps} == {"kernels", "kernels-compile", "train", "tta-seed0"}
    for step in bench_steps:
        gpu.parse_bench_args(step.argv[1:])
    with pytest.raises(ValueError, match="--no-such-flag"):
        gpu.parse_bench_args(["kernels", "--no-such-flag"])


@pytest.mark.parametrize("dry_run", [False, True])
def test_the_training_steps_are_valid_runs(dry_run):
    """Every `nin-train` step's config and overrides load (the profile step's window among them); .ci/run
    runs the whole dry run, profile step included."""
    steps = [s for s in gpu.build_steps(Path("/x"), dry_run) if s.argv[0] == "nin_dist.train"]
    assert {s.name for s in steps} == {"profile", "d2l"}
    for step in steps:
        config = step.argv[step.argv.index("--config") + 1]
        cfg = load_config(REPO / config, [a for a in step.argv[3:] if "=" in a])
        if step.name == "profile":
            assert cfg.train.profile_steps >= 1 and not cfg.train.compile and not cfg.tracking.enabled


def test_the_budgets_fit_in_eight_minutes():
    budgets = sum(s.budget_s for s in gpu.build_steps(Path("/x"), dry_run=False))
    assert budgets <= gpu.TOTAL_S <= 8 * 60 - 10


def test_importing_the_benchmarks_imports_no_mlflow(without_mlflow):
    code = "import sys, nin_dist.bench.__main__; assert 'mlflow' not in sys.modules, 'mlflow imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=without_mlflow, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_dry_run_without_mlflow_writes_its_json(tmp_path, without_mlflow, data_root):
    out = tmp_path / "out"
    env = dict(without_mlflow, NIN_DATA_DIR=str(data_root))
    proc = subprocess.run([sys.executable, "-m", "nin_dist.bench", "gpu", "--dry-run", "--out", str(out),
                           "--steps", "kernels,kernels-compile,d2l"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["passed"]
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["kernels", "kernels-compile", "d2l"]
    assert all(s["status"] == "ok" and (out / s["log"]).exists() for s in steps.values())
    assert "needs CUDA" in steps["kernels"]["note"]
    d2l = steps["d2l"]["result"]
    assert 0.0 <= d2l["test_acc"] <= 1.0 and d2l["img_per_s"] > 0  # 3 steps: less than an epoch
    environment = json.loads((out / "environment.json").read_text())
    assert environment["versions"]["torch"] and "nvidia_smi" in environment
