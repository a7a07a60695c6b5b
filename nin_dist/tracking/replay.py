"""`nin-train --sync-tracking RUN_DIR`: send what a run kept in its spool, once its store is back.

`sync` reads the store from the spool's run.json (`nin_dist.tracking.spool`), checks it answers
within the HTTP bounds (and, when this environment holds MLflow credentials, that it is the store
`$MLFLOW_TRACKING_URI` names: a run folder's file must not choose where they go), and replays the
records into their runs. Exit codes: 0 when everything was sent (the spool is then removed), 1 when a
record failed on the way (the rest waits for the next sync) or was kept as unfit to send (it stays,
with its files); a spool that cannot say where its records go, or a store that does not answer, is a
`TrackingError` (one line, exit 2).
"""

from __future__ import annotations

import logging
from pathlib import Path

from nin_dist.errors import TrackingError
from nin_dist.tracking.redaction import redact_error, redact_uri, secret_values
from nin_dist.tracking.spool import Spool
from nin_dist.tracking.store import HttpBounds, check_credentials_target, check_reachable

log = logging.getLogger(__name__)


def sync(run_dir: Path, uri: str | None = None, timeout_s: float = 30.0) -> int:
    """Replay `run_dir`'s spool into its MLflow run(s): 0 when all is sent, 1 when a record failed
    or was kept. TrackingError when the spool cannot say where its records go."""
    import mlflow

    spool = Spool(run_dir)
    if not Path(run_dir).is_dir():
        raise TrackingError(f"--sync-tracking {run_dir}: no such run folder")
    if not spool.pending():
        log.info("tracking: nothing to send in %s", spool.folder)
        spool.remove_if_idle()
        return 0
    if uri is None:
        uri = spool.tracking_uri()
        if not uri:
            raise TrackingError(f"{spool.meta_path} is missing: cannot tell which MLflow store the records belong to")
        check_credentials_target(uri, str(spool.meta_path))
    secrets = secret_values((uri,))
    with HttpBounds(timeout_s):
        check_reachable(uri, str(spool.meta_path), timeout_s)
        mlflow.set_tracking_uri(uri)
        try:
            done = spool.replay(mlflow.MlflowClient(uri), secrets)
        except Exception as err:
            log.error("tracking: replay into %s stopped after a failure (%s); %d records still wait in %s",
                      redact_uri(uri), redact_error(err, secrets), spool.pending(), spool.folder)
            return 1
    log.info("tracking: sent %d records from %s to %s", done.sent, spool.folder, redact_uri(uri))
    if done.kept:
        log.error("tracking: %d records were not sent (the warnings above say why); they stay in %s with their "
                  "files: correct or delete those lines, then sync again", done.kept, spool.records_path)
        return 1
    spool.remove_if_idle()
    return 0
