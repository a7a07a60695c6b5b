"""launch/pytorchjob.yaml against the PyTorchJob API (kubeflow.org/v1), as the Training Operator's SDK
(`kubeflow-training`) types it, and what the manifest asks of the operator and of torchrun.

The manifest goes through the SDK's generated models (`KubeflowOrgV1PyTorchJob`, over the `kubernetes`
client's pod-template models) and back. `ApiClient.deserialize` alone is lenient: it drops keys its
models do not know and casts a value to the field's type (`int("2")`, `str(8)`, `bool("false")` is
True). So the check is the round trip: the manifest must come back exactly as it was, and each place
where it does not is named.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import yaml
from helpers import REPO
from kubeflow.training import ApiClient

MANIFEST = REPO / "launch" / "pytorchjob.yaml"
JOB_MODEL = "KubeflowOrgV1PyTorchJob"
SPEC = ("spec",)
WORKER = (*SPEC, "pytorchReplicaSpecs", "Worker")
CONTAINER = (*WORKER, "template", "spec", "containers", 0)


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


class _Body:
    """What `ApiClient.deserialize` reads: a response whose `data` is the JSON body."""

    def __init__(self, obj: dict):
        self.data = json.dumps(obj)


def schema_problems(manifest: dict) -> list[str]:
    """Where `manifest` breaks the PyTorchJob API; [] when it round-trips through the SDK's models unchanged."""
    client = ApiClient()
    try:
        job = client.deserialize(_Body(manifest), JOB_MODEL)
    except (ValueError, TypeError) as err:  # a required field missing, or a value its type cannot take
        return [f"not a {JOB_MODEL}: {err}"]
    return differences(manifest, client.sanitize_for_serialization(job))


def differences(given, back, path: str = "$") -> list[str]:
    """Each place where the round-tripped `back` is not `given`: keys dropped or added, values cast."""
    if isinstance(given, dict) and isinstance(back, dict):
        problems = [f"{path}.{key}: unknown to the API (dropped)" for key in given if key not in back]
        problems += [f"{path}.{key}: added by the round trip" for key in back if key not in given]
        for key in given.keys() & back.keys():
            problems += differences(given[key], back[key], f"{path}.{key}")
        return problems
    if isinstance(given, list) and isinstance(back, list) and len(given) == len(back):
        pairs = enumerate(zip(given, back, strict=True))
        return [problem for i, (g, b) in pairs for problem in differences(g, b, f"{path}[{i}]")]
    if type(given) is not type(back) or given != back:
        return [f"{path}: {given!r} is read as {back!r}"]
    return []


def test_manifest_matches_the_pytorchjob_api():
    assert schema_problems(_manifest()) == []


def _at(job: dict, where: tuple) -> dict:
    for key in where:
        job = job[key]
    return job


def rename(where: tuple, old: str, new: str) -> Callable[[dict], None]:
    """An edit of the manifest: the key `old` under `where` spelled `new`."""
    def edit(job: dict) -> None:
        node = _at(job, where)
        node[new] = node.pop(old)
    return edit


def put(where: tuple, key: str, value) -> Callable[[dict], None]:
    """An edit of the manifest: `key` under `where` set to `value`."""
    def edit(job: dict) -> None:
        _at(job, where)[key] = value
    return edit


@pytest.mark.parametrize("edit, named", [
    # A required field misspelled: the spec has no replica specs left.
    pytest.param(rename(SPEC, "pytorchReplicaSpecs", "replicaSpec"), "pytorch_replica_specs", id="replicaSpec"),
    pytest.param(rename(WORKER, "restartPolicy", "restartPolcy"), "Worker.restartPolcy: unknown", id="restartPolcy"),
    # Containers have a restartPolicy of their own (sidecars); a misspelled one is dropped, not ignored here.
    pytest.param(put(CONTAINER, "restartPolcy", "Always"), "containers[0].restartPolcy: unknown",
                 id="container-restartPolcy"),
    pytest.param(rename((*SPEC, "elasticPolicy"), "maxRestarts", "maxRestart"), "elasticPolicy.maxRestart: unknown",
                 id="maxRestart"),
    pytest.param(put(WORKER, "replicas", "two"), "'two'", id="replicas-two"),
    # Values the SDK would cast silently: a string for an integer, a number for a string, "false" for a bool.
    pytest.param(put(WORKER, "replicas", "2"), "Worker.replicas: '2' is read as 2", id="replicas-string"),
    pytest.param(put(SPEC, "nprocPerNode", 8), "nprocPerNode: 8 is read as '8'", id="nprocPerNode-number"),
    pytest.param(put((*CONTAINER, "volumeMounts", 1), "readOnly", "false"), "readOnly: 'false' is read as True",
                 id="readOnly-string"),
])
def test_a_broken_copy_fails_naming_the_field(edit, named):
    job = copy.deepcopy(_manifest())
    edit(job)
    problems = schema_problems(job)
    assert any(named in problem for problem in problems), problems


def test_pytorchjob_names_an_elastic_policy():
    job = _manifest()
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    policy = job["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d"
    assert 1 <= policy["minReplicas"] <= policy["maxReplicas"] and policy["maxRestarts"] >= 1
    # The API types replica specs as a map of any name; the operator knows only these two.
    assert set(job["spec"]["pytorchReplicaSpecs"]) <= {"Master", "Worker"}
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert policy["minReplicas"] <= worker["replicas"] <= policy["maxReplicas"]
    (container,) = worker["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"
    argv = container["command"] + container["args"]
    # torchrun (torch.distributed.run) reads the operator's PET_* settings and starts the trainer.
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert argv[3:5] == ["-m", "nin_dist.train"] and argv[5:7] == ["--config", "configs/d2l.yaml"]
    assert (REPO / "configs" / "d2l.yaml").is_file()
