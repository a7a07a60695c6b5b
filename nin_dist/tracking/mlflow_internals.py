"""The three pieces of MLflow's internals the tracker uses, and why the public API does not do the job.

MLflow's public way to get both is `mlflow.start_run(log_system_metrics=True)`: it adds the context
tags and starts the system-metrics monitor. But `start_run` makes the run the *active* run of the
calling thread, creates it with a synchronous request on the fluent API's global URI, and ties the
monitor to `mlflow.end_run()`, which ends the run with a request of its own. The tracker instead
drives its run with an `MlflowClient` on a background sender that keeps what it cannot send in a
spool and ends the run with a record (so a replay keeps the end time). `MlflowClient.create_run`
adds none of the context tags, and nothing public starts a monitor again once its sampling thread
has stopped. The third, `inputs_as_sent`, keeps MLflow's scoring server from casting a request
to the model's signature before the model can check it. These are the only uses of MLflow's
internals in this package.
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


def inputs_as_sent(signature):
    """`signature` (an `mlflow.models.ModelSignature`), marked so MLflow hands inputs to the model as sent.

    With a tensor signature, MLflow's scoring server (`mlflow models serve`, `mlflow models predict`)
    casts the request's JSON with `np.array(data, dtype=<signature's dtype>)` before the model sees
    it: for uint8, 0.5 becomes 0 and 0.996 becomes 0, so pixels scaled to [0, 1] become a black image
    and get a confident, silently wrong answer. `PyFuncModel.predict` likewise checks an array against
    the signature itself, with a message that quotes the whole array. A signature MLflow derived from
    type hints is the one kind it passes on untouched (`{"inputs": ...}` as sent, arrays as given),
    leaving the checks to the model (`nin_dist.tracking.served_model` makes them, one line each).
    This flag says so; the signature itself stays the uint8 tensor the UI shows.

    The public way to get that mark is a `predict` type hint MLflow understands (e.g.
    `list[list[list[int]]]`): MLflow then derives the signature from the hint (an array of arrays of
    longs, with neither the uint8 dtype nor the 28 x 28 shape) and validates each request against it
    itself, element by element, with its own messages. So the mark is set here instead, pyproject.toml
    bounds MLflow to the releases it was tested on, and tests/tracking/test_served_model.py fails
    when MLflow stops passing inputs through for it.
    """
    signature._is_signature_from_type_hint = True  # written to MLmodel as is_signature_from_type_hint
    return signature
