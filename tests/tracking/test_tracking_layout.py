"""The tracking package's layout: modules of one job and readable size, submodules imported
explicitly, and MLflow's internals in one module only. Read with `ast`, imports inside functions
included. (No import cycles anywhere: tests/test_layout.py.)"""

from __future__ import annotations

import ast
import sys

import pytest
from helpers import REPO
from imports import graph, modules

PACKAGE = REPO / "nin_dist" / "tracking"
# MLflow modules whose documented API the tracker uses; anything else of MLflow's is an internal.
PUBLIC_MLFLOW = {"mlflow", "mlflow.data", "mlflow.entities", "mlflow.exceptions", "mlflow.models", "mlflow.pyfunc",
                 "mlflow.pytorch", "mlflow.types", "mlflow.types.schema"}
MAX_LINES = 300


GRAPH = graph(project_only=False)
FILES = modules()
TRACKING = sorted(name for name in GRAPH if name.startswith("nin_dist.tracking"))


@pytest.mark.parametrize("name", TRACKING)
def test_module_is_short_and_says_its_job(name):
    path = FILES[name]
    assert len(path.read_text().splitlines()) <= MAX_LINES, f"{name} is over {MAX_LINES} lines: split it"
    assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no docstring"


def test_the_package_docstring_lists_its_modules():
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    missing = [name for name in TRACKING if name != "nin_dist.tracking" and f"`{name.rsplit('.', 1)[1]}`" not in doc]
    assert not missing, f"nin_dist/tracking/__init__.py does not list {missing}"


def test_no_module_of_the_package_imports_the_package_itself():
    offenders = [name for name in TRACKING if "nin_dist.tracking" in GRAPH[name]]
    assert not offenders, f"{offenders} import nin_dist.tracking: import the submodule instead"


def test_mlflow_internals_are_imported_in_one_module_only():
    internal = {name: sorted(m for m in GRAPH[name] if m.split(".")[0] == "mlflow" and m not in PUBLIC_MLFLOW)
                for name in TRACKING if name != "nin_dist.tracking.mlflow_internals"}
    assert not any(internal.values()), f"move these into nin_dist/tracking/mlflow_internals.py: {internal}"


def test_the_served_model_code_stands_alone():
    """MLflow copies served_model.py into the model and runs it wherever the model is served: it may
    import the standard library, numpy, pandas, torch and MLflow's public API, never this package."""
    imported = GRAPH["nin_dist.tracking.served_model"]
    allowed = {"numpy", "pandas", "torch"} | PUBLIC_MLFLOW | set(sys.stdlib_module_names)
    assert imported <= allowed, f"served_model.py imports {sorted(imported - allowed)}"
