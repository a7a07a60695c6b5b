"""Where the MLflow store is, whether it answers, and what must never be sent to it.

- `resolve_uri(configured)`: `tracking.uri`, else `$MLFLOW_TRACKING_URI`, else MLflow's own default
  (`sqlite:///mlflow.db` in the working folder), made explicit. A relative sqlite path is made
  absolute so a later `--sync-tracking` from another folder reaches the same file.
- `bound_http_calls(timeout_s)`: one MLflow HTTP request waits at most `timeout_s` and is not
  retried (MLflow's own default is 7 retries with exponential backoff: minutes of a blocked trainer).
  `MLFLOW_HTTP_REQUEST_TIMEOUT` / `MLFLOW_HTTP_REQUEST_MAX_RETRIES` set by the user take precedence.
- `check_reachable(uri, ...)`: a server's `/health`, then one API call, or `TrackingError` naming the URI.
- Secrets: values of environment variables whose names hold TOKEN, PASSWORD, PASSWD, SECRET, KEY or
  CREDENTIAL, and the password of a `user:password@` tracking URI, are replaced by `***` in every
  param, tag and text artifact.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nin_dist.errors import TrackingError

DEFAULT_DB = "mlflow.db"
REDACTED = "***"
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
# Values too short or too common to be a secret (e.g. FOO_KEY=1); replacing them would garble text.
_NOT_SECRET = {"true", "false", "yes", "no", "none", "null", "on", "off"}
_MIN_SECRET_CHARS = 4


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


def redact_uri(uri: str | None) -> str | None:
    """`http://user:***@host:5000` for `http://user:pw@host:5000`; other URIs unchanged."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:{REDACTED}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def uri_password(uri: str | None) -> str | None:
    return urlsplit(uri).password if uri else None


def secret_values(uris: tuple[str | None, ...] = ()) -> list[str]:
    """The strings to keep out of MLflow, longest first (so a secret inside another goes with it)."""
    found = {value for name, value in os.environ.items()
             if _SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_CHARS and value.lower() not in _NOT_SECRET}
    found |= {p for p in map(uri_password, uris) if p}
    return sorted(found, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


_SET_HERE: set[str] = set()  # the MLflow variables this module set (the others are the user's)


def bound_http_calls(timeout_s: float) -> None:
    for name, value in (("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s)))),
                        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")):
        if name not in os.environ or name in _SET_HERE:
            os.environ[name] = value
            _SET_HERE.add(name)


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
                            f"{first_line(err)}") from None


def probe(uri: str, timeout_s: float) -> bool:
    """True if the store answers now (used to decide when to resend what was spooled)."""
    try:
        check_reachable(uri, "", timeout_s)
    except TrackingError:
        return False
    return True


def first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the git repository holding `cwd` (default: the working folder), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None
