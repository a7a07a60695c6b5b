"""What must never be sent to MLflow: secrets, and the password of a tracking URI.

Secrets are the values of environment variables whose names hold TOKEN, PASSWORD, PASSWD, SECRET,
KEY or CREDENTIAL, and the password of a `user:password@` tracking URI. They are replaced by `***`
in every param, tag, dataset field and text artifact (`secret_values` + `redact`). URIs are shown
with `***` for the password (`redact_uri`) and kept on disk without it (`storable_uri`).

Errors too: MLflow's error texts quote the request URL, password included ("API request to
http://user:pw@host/... failed"). `redact_error` is the one-line form of an error for a log line or
a user error, with the secrets and the password of every URI in it replaced by `***`.

And MLflow's own lines: when a run on a tracking server ends, MLflow prints "View run NAME at:
<tracking URI>/#/experiments/..." to stdout, the URI as given, password included. `quiet_run_links`
turns those lines off at their source (MLflow's `MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT`); each
command that ends runs logs its own link instead, without the credentials (`run_link`).
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

from nin_dist.errors import first_line

REDACTED = "***"
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|KEY|CREDENTIAL", re.IGNORECASE)
# Values too short or too common to be a secret (e.g. FOO_KEY=1); replacing them would garble text.
_NOT_SECRET = {"true", "false", "yes", "no", "none", "null", "on", "off"}
_MIN_SECRET_CHARS = 4
# The password of any `scheme://user:password@` in a text (group 1 keeps the rest).
_URI_PASSWORD = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:]*:)[^\s/@]+@")


def uri_password(uri: str | None) -> str | None:
    return urlsplit(uri).password if uri else None


def redact_uri(uri: str | None) -> str | None:
    """`http://user:***@host:5000` for `http://user:pw@host:5000`; other URIs unchanged."""
    if not uri:
        return uri
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:{REDACTED}@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


def storable_uri(uri: str) -> str:
    """The URI without a password (a replay takes credentials from MLflow's usual variables)."""
    password = uri_password(uri)
    return uri.replace(f":{password}@", "@", 1) if password else uri


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


def redact_uris(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` in it replaced by ***."""
    return _URI_PASSWORD.sub(rf"\g<1>{REDACTED}@", text)


def redact_error(err: BaseException | str, secrets: list[str]) -> str:
    """The first line of `err` for a log line or a user error, its secrets and URI passwords as ***.

    The whole text is redacted before it is cut to one line, so a secret across the cut cannot
    leave a piece behind."""
    text = redact_uris(redact(str(err), secrets))
    return first_line(text if text.strip() else type(err).__name__)


def quiet_run_links() -> None:
    """Turn off MLflow's "View run ... at: <url>" lines for this process and the jobs it starts.

    Set whatever the environment held: a user's `false` would put the password back on screen."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page on an MLflow tracking server, as MLflow's own line shows it but without the user
    and password (the browser asks for them); None for a store that is no server (sqlite, a folder)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return None
    base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
