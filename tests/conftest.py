"""Shared fixtures: the real Fashion-MNIST root, a per-test seed, and a checkout the suite leaves as it was."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Made by installing and running the tools, not by the tests: left out of the check below.
_TOOL_FOLDERS = (".venv", ".pytest_cache", ".ruff_cache")


def _made_by_tools(path: str) -> bool:
    parts = path.split("/")
    return parts[0] in _TOOL_FOLDERS or "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)

# Hypothesis keeps caches in ./.hypothesis unless told otherwise; keep them out of the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "nin-dist-hypothesis"))

# Triton reads TRITON_INTERPRET when it is first imported; without CUDA the kernels run on the CPU
# interpreter, so set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import data_dir  # noqa: E402  (after TRITON_INTERPRET is set)

# How the test workers (pytest-xdist, `-n 3` in pyproject.toml) share the suite. By default every test
# of a module runs on one worker, so a module's fixtures (a reference job, an MLflow server, a SLURM
# cluster) are made once. Modules of independent tests with no costly shared fixture are spread test
# by test; modules that share one session fixture run on one worker together.
SPREAD_OVER_WORKERS = {
    "tests/kernels/test_pointwise_mlp.py", "tests/test_train.py", "tests/test_config.py",
    "tests/test_model_kernel.py", "tests/test_checkpoint.py", "tests/test_run_dir.py", "tests/bench/test_bench_cli.py",
}
SHARED_BY_MODULES = {  # module -> the group it runs in
    "tests/tracking/test_sweep.py": "sweep",  # the killed-and-resumed sweep (tracking/sweeps.py)
    "tests/tracking/test_mlflow_ui_browser.py": "sweep",
}


def _worker_scope(nodeid: str) -> str:
    """The unit the test workers are given: tests of one scope run on one worker, in order."""
    module = nodeid.split("::", 1)[0]
    if module in SHARED_BY_MODULES:
        return SHARED_BY_MODULES[module]
    return nodeid if module in SPREAD_OVER_WORKERS else module


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """The slow first (`@pytest.mark.slow`): the workers take the scopes in collection order
    (`--no-loadscope-reorder`), so a long job never starts last and leaves the other workers idle.
    A module that runs on one worker moves as a whole, its tests in their order; a spread module's
    slow tests move on their own."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    heavy = {item.nodeid.split("::", 1)[0] for item in items if slow(item)}

    def later(item) -> bool:
        module = item.nodeid.split("::", 1)[0]
        return not slow(item) if module in SPREAD_OVER_WORKERS else module not in heavy

    def shared(item) -> bool:  # modules sharing one session fixture: the longest scope of all
        return item.nodeid.split("::", 1)[0] in SHARED_BY_MODULES

    items.sort(key=lambda item: (later(item), not shared(item)))  # stable: the order within each part stays


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # ahead of xdist's own choice; unknown without xdist
def pytest_xdist_make_scheduler(config, log):
    # xdist's loadgroup (marks) cannot be used: it renames the test ids, which pytest 9.2 no longer allows.
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _worker_scope(nodeid)

    return ByScope(config, log)


@pytest.fixture(scope="session")
def data_root() -> Path:
    return data_dir().resolve()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _new_files(repo: Path) -> dict[str, tuple[int, int]] | None:
    """Untracked and ignored files of the checkout with (size, mtime), or None outside a git checkout."""
    excludes = [f":(exclude){folder}" for folder in _TOOL_FOLDERS]  # not listed at all: .venv is large
    try:
        top = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=60)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != repo.resolve():
            return None
        out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-z", "--ignored", "-uall",
                              "--", ".", *excludes], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    files = {}
    for entry in out.stdout.split("\0"):
        if entry[:3] in ("?? ", "!! ") and not _made_by_tools(entry[3:]):
            path = repo / entry[3:]
            try:
                stat = path.lstat()
                files[entry[3:]] = (stat.st_size, stat.st_mtime_ns)
            except OSError:  # removed since git listed it
                continue
    return files


@pytest.fixture(scope="session", autouse=True)
def _checkout_left_as_it_was():
    """Fail the session if the tests wrote files into the checkout (e.g. ./mlruns, ./runs, ./mlflow.db)."""
    before = _new_files(REPO)
    yield
    if before is None:
        return  # not a git checkout (an unpacked sdist): nothing to compare with
    after = _new_files(REPO) or {}
    added = sorted(set(after) - set(before))
    changed = sorted(path for path in set(after) & set(before) if after[path] != before[path])
    if added or changed:
        shown = [f"new: {path}" for path in added[:20]] + [f"changed: {path}" for path in changed[:20]]
        more = len(added) + len(changed) - len(shown)
        pytest.fail("the test suite left files in the checkout (write them under tmp_path instead):\n  "
                    + "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else ""), pytrace=False)
