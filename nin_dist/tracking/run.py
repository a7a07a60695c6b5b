"""The MLflow run at start: create it (or take it up again on a resume), with its params and tags.

- A new run goes into `tracking.experiment` (created if missing) under `run.name`, with MLflow's
  context tags (user, source, git) and ours (`run_tags`).
- A resume takes the run id from the checkpoint and continues that run: status back to RUNNING,
  tags refreshed (the world may differ). MLflow refuses to change a param, so keys already logged
  keep their first value (a warning lists those that differ) and only new keys are added.
- Params are the resolved config with dotted keys (`train.epochs`), `tracking.uri` without its
  password. Every value goes through `clean` (secret redaction) first.
- Tags (`run_tags`): world size, nodes, backend, torch / triton / mlflow / python versions and the
  git commit, then the trainer's own (kernel, device); with `tracking.parent_run_id` (a live run of
  the store) also `mlflow.parentRunId`, which nests the run under that one (nin-sweep's trials).
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from nin_dist.config import flatten
from nin_dist.errors import TrackingError
from nin_dist.tracking.mlflow_internals import context_tags
from nin_dist.tracking.redaction import redact_uri

log = logging.getLogger(__name__)

MAX_BATCH = 100  # params / tags per MLflow request (its limit)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's nesting of runs: the UI shows the run under its parent


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the git repository holding `cwd` (default: the working folder), or None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def run_tags(info, tags: dict[str, str]) -> dict[str, str]:
    """Where and with what the run ran; the trainer's `tags` take precedence."""
    import torch

    out = {"world_size": str(info.world_size), "nodes": str(info.num_nodes), "backend": info.backend or "none",
           "torch_version": torch.__version__, "triton_version": _version("triton"),  # torch's with its build
           "mlflow_version": _version("mlflow"), "python_version": platform.python_version()}
    # The working folder's repository, else the one holding this code (a run folder may be elsewhere).
    commit = git_commit() or git_commit(Path(__file__).parent)
    if commit:
        out["git_commit"] = commit
    return out | {key: str(value) for key, value in tags.items()}


def experiment_id(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except MlflowException:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"tracking.experiment={name!r} is deleted in {redact_uri(client.tracking_uri)}; "
                            f"restore it or choose another name")
    return experiment.experiment_id


def _parent(client, run_id: str) -> str:
    """`tracking.parent_run_id`, once the store shows it is a live run."""
    shown = redact_uri(client.tracking_uri)
    _live_run(client, run_id, f"tracking.parent_run_id={run_id} is not a run in {shown}",
              f"tracking.parent_run_id={run_id} is deleted in {shown}; restore it or choose another")
    return run_id


def _live_run(client, run_id: str, if_missing: str, if_deleted: str):
    """The run `run_id`; TrackingError(`if_missing`) when the store does not hold it, TrackingError(`if_deleted`)
    when it is deleted."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(if_missing) from None
    if run.info.lifecycle_stage == "deleted":
        raise TrackingError(if_deleted)
    return run


def reopen(client, run_id: str, what: str, if_missing: str, if_deleted: str):
    """The run `run_id` (named `what` in errors), its status back to RUNNING; TrackingError, with the
    advice `if_missing` or `if_deleted`, when the store does not hold it or it is deleted."""
    shown = redact_uri(client.tracking_uri)
    run = _live_run(client, run_id, f"{what} is not in {shown}; {if_missing}",
                    f"{what} is deleted in {shown}; {if_deleted}")
    client.update_run(run_id, status="RUNNING")
    return run


def open_run(client, cfg, info, resume_run_id: str | None, tags: dict[str, str],
             clean: Callable[[object], str]) -> str:
    """The id of the new or resumed run, its params and tags logged."""
    from mlflow.entities import Param, RunTag

    params = {key: clean(value) for key, value in flatten(cfg).items()}
    params["tracking.uri"] = clean(redact_uri(cfg.tracking.uri))
    tags = {key: clean(value) for key, value in run_tags(info, tags).items()}
    if cfg.tracking.parent_run_id:
        tags[PARENT_TAG] = _parent(client, cfg.tracking.parent_run_id)
    if resume_run_id:
        run = reopen(client, resume_run_id, f"MLflow run {resume_run_id} (from the checkpoint)",
                     "use the tracking.uri the run started with, or run.resume=false",
                     "restore it, or start afresh with run.resume=false")
        run_id = resume_run_id
        old = run.data.params
        changed = sorted(key for key in params if key in old and old[key] != params[key])
        if changed:
            log.warning("tracking: resumed run %s keeps its first values of %s", run_id, ", ".join(changed))
        params = {key: value for key, value in params.items() if key not in old}
        _log_batches(client, run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    else:
        run = client.create_run(experiment_id(client, cfg.tracking.experiment), run_name=clean(cfg.run.name),
                                tags={key: clean(value) for key, value in context_tags(tags).items()})
        run_id = run.info.run_id
    _log_batches(client, run_id, params=[Param(key, value) for key, value in params.items()])
    return run_id


def _log_batches(client, run_id: str, params: Sequence = (), tags: Sequence = ()) -> None:
    """`client.log_batch` in requests of at most MAX_BATCH params and MAX_BATCH tags."""
    for lo in range(0, max(len(params), len(tags)), MAX_BATCH):
        client.log_batch(run_id, params=params[lo: lo + MAX_BATCH], tags=tags[lo: lo + MAX_BATCH])
