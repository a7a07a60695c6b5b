"""The MLflow store: where it is, whether it answers, and how long one HTTP request may take.

- `resolve_uri(configured)`: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else MLflow's own default
  (`sqlite:///mlflow.db` in the working folder), made explicit. A relative sqlite path is made
  absolute so a later `--sync-tracking` from another folder reaches the same file.
- `HttpBounds(timeout_s)`: while open, one MLflow HTTP request waits at most `timeout_s` and is not
  retried (MLflow's own default is 7 retries with exponential backoff: minutes of a blocked trainer).
  MLflow reads `MLFLOW_HTTP_REQUEST_TIMEOUT` / `MLFLOW_HTTP_REQUEST_MAX_RETRIES` at each request;
  values the user set take precedence, and closing removes exactly the ones it set.
- `check_reachable(uri, ...)`: a server's `/health`, then one API call, or `TrackingError` naming the
  URI (its password shown as `***`, in MLflow's error text too); `probe(uri, ...)`: the same as True
  or False.
- `check_credentials_target(uri, source)`: this environment's MLflow credentials go only to the store
  `$MLFLOW_TRACKING_URI` names, never to one that only a file in a run folder names.
- `MAX_BATCH_METRICS`: the most metrics one `log_batch` request may carry.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from pathlib import Path

from nin_dist.errors import TrackingError
from nin_dist.tracking.redaction import redact_error, redact_uri, secret_values

DEFAULT_DB = "mlflow.db"
MAX_BATCH_METRICS = 1000  # MLflow's log_batch limit
# The variables through which MLflow's client attaches credentials to every request it sends.
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_CLIENT_CERT_PATH", "MLFLOW_TRACKING_AUTH", "MLFLOW_TRACKING_AWS_SIGV4")


def resolve_uri(configured: str | None) -> tuple[str, str]:
    """(uri, where it came from: 'tracking.uri', '$MLFLOW_TRACKING_URI' or 'the default')."""
    if configured:
        uri, source = configured, "tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        uri, source = os.environ["MLFLOW_TRACKING_URI"], "$MLFLOW_TRACKING_URI"
    else:
        uri, source = f"sqlite:///{DEFAULT_DB}", "the default"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri, source


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


class HttpBounds:
    """MLflow's HTTP timeout and retries for this process, set while open (`with`, or open/close).

    Only variables absent from the environment are set (the user's own values win, and so do those
    of bounds opened earlier and still open); `close` removes those this object set, and nothing else.
    """

    def __init__(self, timeout_s: float):
        self._values = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
                        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        self._set: list[str] = []  # the names this object set, to remove on close

    def open(self) -> HttpBounds:
        for name, value in self._values.items():
            if name not in os.environ:
                os.environ[name] = value
                self._set.append(name)
        return self

    def close(self) -> None:
        while self._set:
            os.environ.pop(self._set.pop(), None)

    def __enter__(self) -> HttpBounds:
        return self.open()

    def __exit__(self, *exc_info) -> None:
        self.close()


def check_reachable(uri: str, source: str, timeout_s: float) -> None:
    """Return if the store answers one API call within the bounds; else raise TrackingError."""
    from mlflow import MlflowClient

    shown = redact_uri(uri)
    hint = "start one (launch/mlflow-server.sh) or set tracking.enabled=false"
    if is_http(uri):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
        except requests.Timeout:
            raise TrackingError(f"MLflow tracking server {shown} (from {source}) did not answer within "
                                f"{timeout_s:g} s (tracking.timeout_s); {hint}") from None
        except requests.ConnectionError:
            raise TrackingError(f"MLflow tracking server {shown} (from {source}) is unreachable "
                                f"(connection failed); {hint}") from None
        except requests.HTTPError as err:
            raise TrackingError(f"MLflow tracking server {shown} (from {source}) is unhealthy "
                                f"(/health: HTTP {err.response.status_code}); {hint}") from None
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # store errors come as MlflowException, SQLAlchemy or OS errors
        raise TrackingError(f"MLflow tracking store {shown} (from {source}) refused a request: "
                            f"{redact_error(err, secret_values((uri,)))}") from None


def probe(uri: str, timeout_s: float) -> bool:
    """True if the store answers now (used to decide when to resend what was spooled)."""
    try:
        check_reachable(uri, "", timeout_s)
    except TrackingError:
        return False
    return True


def _origin(uri: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(uri)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # a port that is not a number
        port = None
    return parts.scheme, (parts.hostname or "").lower(), port


def check_credentials_target(uri: str, source: str) -> None:
    """TrackingError unless `uri` (read from `source`, a run folder's file) is the store this environment's
    credentials are meant for: a tampered run folder must not collect them with a server of its own."""
    held = [name for name in CREDENTIAL_VARS if os.environ.get(name)]
    if not held or not is_http(uri):
        return
    home = os.environ.get("MLFLOW_TRACKING_URI")
    if home and _origin(home) == _origin(uri):
        return
    meant = f"$MLFLOW_TRACKING_URI={redact_uri(home)}" if home else "a store $MLFLOW_TRACKING_URI does not name"
    raise TrackingError(f"{source} names the MLflow store {redact_uri(uri)}, but this environment's credentials "
                        f"({', '.join(held)}) are for {meant}; a run folder may not choose where they go: set "
                        f"MLFLOW_TRACKING_URI to that store to send its records there")
