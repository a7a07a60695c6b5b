"""How the test workers (pytest-xdist, `-n 3 --dist loadscope` in pyproject.toml) share the suite.

By default every test of a module runs on one worker, so a module's fixtures (a reference job, an
MLflow server, a SLURM cluster) are made once. Modules of independent tests with no costly shared
fixture are spread test by test; modules that share one session fixture run on one worker together.
The slow start first. This refines xdist's `loadscope`, the suite's own `--dist`; a user who asks for
another (`--dist load`, `worksteal`, ...) gets xdist's scheduler for it, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SPREAD_OVER_WORKERS = {
    "tests/kernels/test_pointwise_mlp.py", "tests/test_train.py", "tests/test_config.py",
    "tests/test_model_kernel.py", "tests/test_checkpoint.py", "tests/test_run_dir.py", "tests/bench/test_bench_cli.py",
}
SHARED_BY_MODULES = {  # module -> the group it runs in
    "tests/tracking/test_sweep.py": "sweep",  # the killed-and-resumed sweep (tracking/sweeps.py)
    "tests/tracking/test_mlflow_ui_browser.py": "sweep",
}


def check_modules(repo: Path = REPO) -> None:
    """Raise pytest's usage error (one line, exit code 4) if a module named above is not in `repo`: a
    renamed module would silently fall back to the default (one worker, no group), so the suite refuses
    to start instead (tests/conftest.py calls this when pytest configures, before collecting)."""
    if unknown := sorted(module for module in {*SPREAD_OVER_WORKERS, *SHARED_BY_MODULES}
                         if not (repo / module).is_file()):
        raise pytest.UsageError(f"tests/scheduling.py names test modules that do not exist: {', '.join(unknown)}")


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def worker_scope(nodeid: str) -> str:
    """The unit the test workers are given: tests of one scope run on one worker, in order."""
    module = _module(nodeid)
    if module in SHARED_BY_MODULES:
        return SHARED_BY_MODULES[module]
    return nodeid if module in SPREAD_OVER_WORKERS else module


def slow_first(items: list) -> None:
    """Sort the collected `items` so the slow (`@pytest.mark.slow`) come first: the workers take the
    scopes in collection order (`--no-loadscope-reorder`), so a long job never starts last and leaves
    the other workers idle. A module that runs on one worker moves as a whole, its tests in their
    order; a spread module's slow tests move on their own."""
    def slow(item) -> bool:
        return item.get_closest_marker("slow") is not None

    heavy = {_module(item.nodeid) for item in items if slow(item)}

    def later(item) -> bool:
        module = _module(item.nodeid)
        return not slow(item) if module in SPREAD_OVER_WORKERS else module not in heavy

    def shared(item) -> bool:  # modules sharing one session fixture: the longest scope of all
        return _module(item.nodeid) in SHARED_BY_MODULES

    items.sort(key=lambda item: (later(item), not shared(item)))  # stable: the order within each part stays


def make_scheduler(config, log):
    """The scheduler for `--dist loadscope` (the suite's own, from pyproject.toml, or a user's): xdist's
    LoadScopeScheduling over the scopes above. None for any other `--dist`, which leaves it to xdist.
    (xdist's loadgroup marks cannot be used instead: they rename the test ids, which pytest 9.2 refuses.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ByScope(config, log)
