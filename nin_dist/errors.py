"""User errors (bad config, data, arguments) and how they are shown.

`main` prints a `UserError` as one line (`report`) and exits with code 2; anything else keeps its
traceback and exits with 1.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A problem the user can fix (config, data, arguments). Printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type, or holds an impossible value."""


class DataError(UserError):
    """Fashion-MNIST missing, truncated, corrupt or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint that does not belong to this run's config."""


class RunDirError(UserError):
    """`run.out_dir` cannot be made or written, or another job holds it."""


class DivergedError(UserError):
    """The training loss, the parameters or the optimizer state became NaN or infinite."""


class TrackingError(UserError):
    """The MLflow tracking server cannot be reached or refused the run."""


class ModelError(UserError):
    """A model to evaluate that does not exist or cannot be loaded (a bad URI, an unknown name or id)."""


def first_line(err: BaseException | str, limit: int = 300) -> str:
    """The first line of an error (or of a program's output), shortened: user errors print as one line."""
    lines = str(err).strip().splitlines()
    line = lines[0] if lines else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def report(prog: str, err: UserError) -> int:
    """Print `prog: error: ...` on stderr; returns the exit code."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return err.exit_code
