"""Shared fixtures: the real Fashion-MNIST root, a per-test seed, and a checkout the suite leaves as it was;
the hooks that share the suite among the test workers (tests/scheduling.py)."""

import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from nin_dist.download import raw_folder

REPO = Path(__file__).resolve().parents[1]
# Made by installing and running the tools, not by the tests: left out of the check below.
_TOOL_FOLDERS = (".venv", ".pytest_cache", ".ruff_cache")


# Where a download of the real data lands when the suite finds no copy (tests/helpers.py data_dir),
# as a first `make train` downloads it: the user's git-ignored ./data, which every later run and
# `make train` read, kept like .venv. Anything else a test writes under ./data still fails the check.
_DATA_DOWNLOAD = raw_folder(Path("data")).as_posix() + "/"


def _made_by_tools(path: str) -> bool:
    parts = path.split("/")
    return (parts[0] in _TOOL_FOLDERS or "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)
            or path.startswith(_DATA_DOWNLOAD))


# Hypothesis keeps caches in ./.hypothesis unless told otherwise; keep them out of the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "nin-dist-hypothesis"))

# Triton reads TRITON_INTERPRET when it is first imported; without CUDA the kernels run on the CPU
# interpreter, so set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import scheduling  # noqa: E402  (how the test workers share the suite)
from helpers import data_dir  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_configure(config):
    if unknown := scheduling.unknown_modules():
        raise pytest.UsageError(f"tests/scheduling.py names test modules that do not exist: {', '.join(unknown)}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    scheduling.slow_first(items)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # ahead of xdist's own choice; unknown without xdist
def pytest_xdist_make_scheduler(config, log):
    return scheduling.make_scheduler(config, log)


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
