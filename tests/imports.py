"""The project's imports read from its source with `ast`: what each module of nin_dist and kernels
imports, anywhere in the file (imports inside functions included: a lazy import is still a need)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("nin_dist", "kernels")


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (project or not); `from a import b` is the module a.b when the
    project has one, else a name from a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from .ops import y`
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return out - {name}


def graph(project_only: bool = True) -> dict[str, set[str]]:
    """Module -> the modules it imports; with `project_only`, just those of nin_dist and kernels."""
    found = modules()
    known = set(found)
    edges = {name: imports(name, path, known) for name, path in found.items()}
    return {name: deps & known for name, deps in edges.items()} if project_only else edges
