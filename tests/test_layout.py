"""The layout holds: no import cycles among nin_dist and kernels, kernels is a leaf, small modules,
and the config stays free of torch.

Imports are read from the source with `ast`, including those inside functions: a cycle through a
lazy import is still two modules that need each other.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO
from imports import graph, modules

MAX_LINES = 450  # a module longer than this is doing more than one job
EXEMPT = {"kernels.pointwise_mlp": "the fused kernels with their config tables: one file, by design"}
TRAIN_MAX_LINES = 300  # train.py is the loop read top to bottom


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_reader_sees_lazy_relative_and_from_imports():
    edges = graph()
    assert "nin_dist.config" in edges["nin_dist.model"]  # a top-level import
    assert "kernels.pointwise_mlp" in edges["kernels.ops"]  # `from . import pointwise_mlp`
    assert "nin_dist.tracking.tracker" in edges["nin_dist.tracking"]  # inside make_tracker
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_never_imports_nin_dist():
    edges = graph()
    offenders = {name: sorted(e for e in deps if e.startswith("nin_dist")) for name, deps in edges.items()
                 if name.startswith("kernels")}
    assert not any(offenders.values()), offenders


def test_config_and_shapes_do_not_import_torch():
    # train_args too: launch/multinode.sh checks nin-train's arguments with it before torchrun starts.
    code = ("import sys, nin_dist.config, nin_dist.shapes, nin_dist.train_args\n"
            "print(sorted(m for m in ('torch', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_trainer_does_not_import_the_compiler_until_it_compiles():
    """torch._dynamo is about a second of every process's start-up (each torchrun worker, each sweep
    trial): imported only when train.compile asks for it. The layers' opaque ops are torch.library
    custom ops (nin_dist.layers), whose registration does not import it."""
    code = ("import sys, nin_dist.train, nin_dist.eval_cli\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout


@pytest.mark.parametrize("name", sorted(set(modules()) - set(EXEMPT)))
def test_modules_are_small(name):
    lines = len(modules()[name].read_text().splitlines())
    limit = TRAIN_MAX_LINES if name == "nin_dist.train" else MAX_LINES
    assert lines <= limit, f"{name} has {lines} lines (limit {limit}): split it by job"
