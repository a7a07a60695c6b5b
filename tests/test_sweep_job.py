"""launch/sweep-job.yaml against the Kubernetes Job API (batch/v1), as the `kubernetes` client's
generated models type it: the same round trip as tests/test_pytorchjob.py (a key the models do not
know is dropped, a value of the wrong type cast), and what the manifest asks of nin-sweep."""

from __future__ import annotations

import copy

import yaml
from helpers import REPO
from kubernetes.client import ApiClient
from test_pytorchjob import _Body, differences

from nin_dist.sweep.cli import parse_args

MANIFEST = REPO / "launch" / "sweep-job.yaml"


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def schema_problems(manifest: dict) -> list[str]:
    client = ApiClient()
    try:
        job = client.deserialize(_Body(manifest), "V1Job")
    except (ValueError, TypeError) as err:
        return [f"not a V1Job: {err}"]
    return differences(manifest, client.sanitize_for_serialization(job))


def test_manifest_matches_the_job_api():
    assert schema_problems(_manifest()) == []


def test_a_broken_copy_fails_naming_the_field():
    job = copy.deepcopy(_manifest())
    job["spec"]["completionsMode"] = job["spec"].pop("completionMode")
    assert "$.spec.completionsMode: unknown to the API (dropped)" in schema_problems(job)


def test_every_pod_is_one_worker_and_the_secrets_travel_in_the_environment():
    spec = _manifest()["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    (container,) = spec["template"]["spec"]["containers"]
    args = parse_args(container["args"])  # nin-sweep takes the args as they are
    assert args.workers == 1 and args.storage is None
    assert not any("@" in arg and ":" in arg.partition("@")[0].rpartition("//")[2] for arg in container["args"])
    secrets = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert secrets == {"NIN_SWEEP_STORAGE", "PGPASSWORD"}


