"""The run's logged model as a new version of a registered model (`tracking.register_model=NAME`).

`register_version` does what `mlflow.register_model("models:/<model_id>", NAME)` does, with the
tracker's client: the registered model NAME is created if missing, a version is made from the
LoggedModel (source `models:/<model_id>`, linked to the run and the model), and the LoggedModel's
`mlflow.modelVersions` tag lists it, so the UI links the two. It runs as a `register` record
after the `model` record (`nin_dist.tracking.records`), so it waits in the spool through an outage
like every other call and `nin-train --sync-tracking` sends it in order.

A record may be sent twice (a crash before its progress was saved), so a resend changes nothing: a
version of NAME made from the same LoggedModel is found first and kept. The model registered is
the run's newest READY LoggedModel of that name (a resent `model` record logs a new one).

Versions are found again with `models:/NAME/<version>`, or with an alias (`models:/NAME@best`,
set by `nin-sweep --register NAME`); stages are deprecated in MLflow and not used.
"""

from __future__ import annotations

# The LoggedModel tag that lists its registered versions as JSON [{"name", "version"}] (what
# mlflow.register_model writes; the UI reads it).
MODEL_VERSIONS_TAG = "mlflow.modelVersions"


class NothingToRegister(LookupError):
    """The run has no READY logged model of the name asked for."""


def newest_ready_model(client, run_id: str, model_name: str):
    """The run's newest READY LoggedModel named `model_name`; NothingToRegister when there is none."""
    from mlflow.entities import LoggedModelStatus

    outputs = client.get_run(run_id).outputs
    steps = {output.model_id: output.step for output in (outputs.model_outputs if outputs else [])}
    models = [client.get_logged_model(model_id) for model_id in steps]
    ready = [m for m in models if m.name == model_name and m.status == LoggedModelStatus.READY]
    if not ready:
        raise NothingToRegister(f"run {run_id} has no READY logged model named {model_name!r} to register")
    return max(ready, key=lambda m: (steps[m.model_id], m.creation_timestamp))


def register_version(client, run_id: str, name: str, model_name: str):
    """The version of registered model `name` made from the run's model `model_name` (made now, or
    found made before)."""
    import json

    from mlflow.exceptions import MlflowException

    model = newest_ready_model(client, run_id, model_name)
    source = f"models:/{model.model_id}"
    for version in client.search_model_versions(f"run_id = '{run_id}'"):  # its model_id: not kept by every store
        if version.name == name and version.source == source:
            return version
    try:
        client.create_registered_model(name)
    except MlflowException as err:  # made by an earlier run (or another process meanwhile)
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # MLflow's error code names
            raise
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          model_id=model.model_id)
    try:
        listed = json.loads(client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    except ValueError:  # not written by MLflow: the new list starts with this version
        listed = []
    listed = listed if isinstance(listed, list) else []
    client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(
        [*listed, {"name": version.name, "version": version.version}])})
    return version


def versions_of_run(client, name: str, run_id: str) -> list:
    """The versions of registered model `name` made from run `run_id`'s models, newest first."""
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name]
    return sorted(found, key=lambda v: int(v.version), reverse=True)
