"""Shared fixtures: the real Fashion-MNIST root, a per-test seed, and a checkout the suite leaves as it was
(tests/checkout.py); the hooks that share the suite among the test workers (tests/scheduling.py)."""

import os
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Hypothesis keeps caches in ./.hypothesis unless told otherwise; keep them out of the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "nin-dist-hypothesis"))

# The suite's test workers (3, pyproject.toml) share the machine's cores with every job they start:
# each process takes one thread unless it says otherwise (a test's train.threads=N). Oversubscribed,
# torch's OpenMP threads wait on each other and every job slows down. nin-train, as torch, reads
# OMP_NUM_THREADS for a process alone on its machine (nin_dist.distributed.default_threads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if os.environ["OMP_NUM_THREADS"].isdigit() and int(os.environ["OMP_NUM_THREADS"]) >= 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch read it at import, before this line

# Triton reads TRITON_INTERPRET when it is first imported; without CUDA the kernels run on the CPU
# interpreter, so set it before any test module can import triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import checkout  # noqa: E402  (what the suite may leave in the checkout)
import scheduling  # noqa: E402  (how the test workers share the suite)
from helpers import data_dir  # noqa: E402  (after TRITON_INTERPRET is set)


def pytest_configure(config):
    scheduling.check_modules()


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


@pytest.fixture(scope="session", autouse=True)
def _checkout_left_as_it_was():
    """Fail the session if the tests wrote files into the checkout (e.g. ./mlruns, ./runs, ./mlflow.db)."""
    before = checkout.new_files(REPO)
    yield
    if before is None:
        return  # not a git checkout (an unpacked sdist): nothing to compare with
    after = checkout.new_files(REPO) or {}
    added = sorted(set(after) - set(before))
    changed = sorted(path for path in set(after) & set(before) if after[path] != before[path])
    if added or changed:
        shown = [f"new: {path}" for path in added[:20]] + [f"changed: {path}" for path in changed[:20]]
        more = len(added) + len(changed) - len(shown)
        pytest.fail("the test suite left files in the checkout (write them under tmp_path instead):\n  "
                    + "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else ""), pytrace=False)
