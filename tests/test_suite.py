"""The suite's own machinery: where it finds the data (tests/helpers.py), what it may leave in the checkout
(tests/checkout.py) and how its workers share it (tests/scheduling.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import checkout
import pytest
import scheduling
from helpers import REPO, finish, start

from nin_dist.data import FILES, locate
from nin_dist.download import raw_folder

# What a clone holds that a data test needs; tests/ itself comes whole.
CLONED = ("nin_dist", "kernels", "configs", "tests", "pyproject.toml")

# Written into the clone: the suite there must read the clone's own ./data.
WHERE = '''
from pathlib import Path


def test_the_data_is_the_clones_own(data_root):
    assert data_root == (Path.cwd() / "data").resolve()
'''


def test_a_fresh_clone_finds_the_data_where_nin_train_does(tmp_path, data_root):
    """As a new user has it: a clone with no ../shared beside it, no $NIN_DATA_DIR, and the four files
    directly in its ./data (the layout Debian's package and the upstream repository use). `pytest` there
    finds them as `nin-train` does and runs a real data test."""
    clone = tmp_path / "clone"  # tmp_path holds no `shared`
    for name in CLONED:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, clone / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, clone / name)
    (clone / "data").mkdir()
    for idx in FILES.values():
        src = locate(data_root, idx)
        (clone / "data" / src.name).symlink_to(src)
    (clone / "tests" / "test_where.py").write_text(WHERE)
    env = {k: v for k, v in os.environ.items() if k != "NIN_DATA_DIR" and not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(clone)  # this clone's nin_dist, not the installed one
    proc = start([sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-q", "tests/test_where.py",
                  "tests/test_data.py::test_reading_writes_nothing_into_the_root"], cwd=clone, env=env)
    rc, out = finish(proc, timeout=300)
    assert rc == 0 and "2 passed" in out, out[-3000:]


@pytest.mark.parametrize("dist", ["load", "loadfile", "worksteal", "each"])
def test_a_dist_the_user_asks_for_gets_xdists_own_scheduler(dist):
    assert scheduling.make_scheduler(_config(dist), None) is None


def test_loadscope_the_suites_own_dist_runs_by_the_suites_scopes():
    from xdist.scheduler import LoadScopeScheduling

    scheduler = scheduling.make_scheduler(_config("loadscope"), None)
    assert isinstance(scheduler, LoadScopeScheduling)
    assert scheduler._split_scope("tests/test_data.py::test_a") == "tests/test_data.py"  # a module on one worker
    assert scheduler._split_scope("tests/test_config.py::test_a") == "tests/test_config.py::test_a"  # spread
    assert scheduler._split_scope("tests/tracking/test_sweep.py::test_a") == "sweep"  # shared with another module


def test_the_modules_the_scheduling_names_exist_or_the_suite_does_not_start(tmp_path):
    scheduling.check_modules()  # this checkout: all there
    with pytest.raises(pytest.UsageError, match="names test modules that do not exist: tests/bench/test_bench_cli"):
        scheduling.check_modules(tmp_path)  # a checkout without them, as after a rename


def _config(dist: str) -> pytest.Config:
    """A pytest config as xdist's controller has it after `-n 3 --dist DIST`."""
    config = pytest.Config(pytest.PytestPluginManager())
    config.option.dist, config.option.tx, config.option.numprocesses = dist, ["popen"] * 3, 3
    return config


def test_the_checkout_check_lets_a_data_download_land_and_lists_anything_else(tmp_path):
    """The suite downloads the data into the checkout's ./data when it finds no copy (as `make train`
    does): those files are the user's, not left behind by a test; a stray file beside them is."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    (tmp_path / ".gitignore").write_text("/data/\n")
    before = checkout.new_files(tmp_path)
    raw = raw_folder(tmp_path / "data")  # where nin_dist.download puts the files
    raw.mkdir(parents=True)
    for idx in FILES.values():
        (raw / (idx.name + ".gz")).write_bytes(b"downloaded")
    (tmp_path / "data" / "notes.txt").write_text("a test's")
    assert sorted(set(checkout.new_files(tmp_path)) - set(before)) == ["data/notes.txt"]
