"""What the suite may leave in the checkout: the files it lists before and after a session
(tests/conftest.py fails the session on any new or changed one), and the few it leaves out."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nin_dist.download import raw_folder

# Made by installing and running the tools, not by the tests.
TOOL_FOLDERS = (".venv", ".pytest_cache", ".ruff_cache")
# Where a download of the real data lands when the suite finds no copy (tests/helpers.py data_dir),
# as a first `make train` downloads it: the user's git-ignored ./data, which every later run and
# `make train` read, kept like .venv. Anything else a test writes under ./data is still listed.
DATA_DOWNLOAD = raw_folder(Path("data")).as_posix() + "/"


def _left_out(path: str) -> bool:
    parts = path.split("/")
    return (parts[0] in TOOL_FOLDERS or "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts)
            or path.startswith(DATA_DOWNLOAD))


def new_files(repo: Path) -> dict[str, tuple[int, int]] | None:
    """Untracked and ignored files of the checkout with (size, mtime), or None outside a git checkout."""
    excludes = [f":(exclude){folder}" for folder in TOOL_FOLDERS]  # not listed at all: .venv is large
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
        if entry[:3] in ("?? ", "!! ") and not _left_out(entry[3:]):
            path = repo / entry[3:]
            try:
                stat = path.lstat()
                files[entry[3:]] = (stat.st_size, stat.st_mtime_ns)
            except OSError:  # removed since git listed it
                continue
    return files
