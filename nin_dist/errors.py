"""User errors: bad config, bad data, bad arguments.

`main` prints a `UserError` as one line and exits with code 2; anything else keeps its traceback
and exits with 1.
"""


class UserError(Exception):
    """A problem the user can fix (config, data, arguments). Printed as one line, exit code 2."""

    exit_code = 2


class ConfigError(UserError):
    """A config key that is unknown, of the wrong type, or holds an impossible value."""


class DataError(UserError):
    """Fashion-MNIST missing, truncated, corrupt or of the wrong shape."""


class CheckpointError(UserError):
    """A checkpoint that does not belong to this run's config."""


class TrackingError(UserError):
    """The MLflow tracking server cannot be reached or refused the run."""
