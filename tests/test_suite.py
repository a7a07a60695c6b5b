"""The suite's own machinery: where it finds the data (tests/helpers.py) and how its workers share it
(tests/scheduling.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import scheduling
from helpers import REPO, finish, start

from nin_dist.data import FILES, locate

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


def test_the_modules_the_scheduling_names_exist(tmp_path):
    assert scheduling.unknown_modules() == []
    everything = sorted({*scheduling.SPREAD_OVER_WORKERS, *scheduling.SHARED_BY_MODULES})
    assert scheduling.unknown_modules(tmp_path) == everything  # what a checkout without them reports


def test_a_renamed_module_stops_the_suite_before_it_runs(tmp_path):
    """The check runs when pytest configures, before any test: one line, pytest's usage-error exit."""
    tests = tmp_path / "tests"
    shutil.copytree(REPO / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    (tests / "test_config.py").rename(tests / "test_configuration.py")
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntestpaths = ['tests']\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "-q"], cwd=tmp_path,
                         env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    assert "tests/scheduling.py names test modules that do not exist: tests/test_config.py" in out.stderr


def _config(dist: str) -> pytest.Config:
    """A pytest config as xdist's controller has it after `-n 3 --dist DIST`."""
    config = pytest.Config(pytest.PytestPluginManager())
    config.option.dist, config.option.tx, config.option.numprocesses = dist, ["popen"] * 3, 3
    return config
