"""The two pieces of MLflow's internals the tracker uses, and why the public API does not do the job.

MLflow's public way to get both is `mlflow.start_run(log_system_metrics=True)`: it adds the context
tags and starts the system-metrics monitor. But `start_run` makes the run the *active* run of the
calling thread, creates it with a synchronous request on the fluent API's global URI, and ties the
monitor to `mlflow.end_run()`, which ends the run with a request of its own. The tracker instead
drives its run with an `MlflowClient` on a background sender that keeps what it cannot send in a
spool and ends the run with a record (so a replay keeps the end time). `MlflowClient.create_run`
adds none of the context tags, and nothing public starts a monitor again once its sampling thread
has stopped. These are the only imports of MLflow modules outside its public API in this package.
"""

from __future__ import annotations


def context_tags(tags: dict[str, str]) -> dict[str, str]:
    """MLflow's context tags (user, source name and type, git commit of the entry point), `tags` over them.

    `mlflow.start_run` resolves these through the run-context registry before `create_run`; the
    client's `create_run` does not, so a run created through it would lack them.
    """
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)


def system_metrics_monitor(run_id: str, resume: bool, tracking_uri: str):
    """MLflow's system-metrics monitor (`system/...` metrics) for `run_id`, not started yet.

    The public switch (`start_run(log_system_metrics=True)` or `enable_system_metrics_logging()`)
    attaches a monitor only to a run started by `mlflow.start_run`. The monitor's sampling thread
    also returns at its first failed request (a lost store), so the tracker starts a new one, with
    `resume=True` to continue the step count, when the store is back.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    return SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
