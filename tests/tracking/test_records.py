"""Records: which failures the store means for good, and which records are fit to send."""

from __future__ import annotations

import pytest
from mlflow.exceptions import RestException

from nin_dist.tracking.records import BadRecord, apply_record, record_problem, refused


@pytest.mark.parametrize(("error_code", "dropped"), [
    ("INVALID_PARAMETER_VALUE", True),  # HTTP 400: the record itself is wrong
    ("RESOURCE_DOES_NOT_EXIST", True),  # 404: e.g. a run that was deleted
    ("REQUEST_LIMIT_EXCEEDED", False),  # 429: the same record may go later
    ("INTERNAL_ERROR", False),  # 500
    ("TEMPORARILY_UNAVAILABLE", False),  # 503
])
def test_only_a_record_the_store_rejects_is_refused(error_code, dropped):
    """The errors as MLflow's REST client raises them for a server's answer."""
    assert refused(RestException({"error_code": error_code, "message": "no"})) is dropped


def test_failures_on_the_way_are_not_refusals():
    assert not refused(ConnectionError("reset")) and not refused(OSError("disk full"))


def test_an_unknown_record_kind_is_a_bad_record(tmp_path):
    with pytest.raises(BadRecord, match="unknown tracking record kind 'bogus'"):
        apply_record(None, {"kind": "bogus", "run_id": "a" * 32}, tmp_path)


METRICS = {"kind": "metrics", "run_id": "a" * 32, "step": 1, "timestamp": 2, "metrics": {"x/y": 0.5}}


@pytest.mark.parametrize(("record", "problem"), [
    (METRICS, None),
    (METRICS | {"metrics": {"x/y": 1}}, None),  # an integer value is a number
    ([METRICS], "a JSON list, not a record"),
    ({"kind": {"a": 1}, "run_id": "r"}, "unknown tracking record kind"),
    (METRICS | {"run_id": None}, "without a run id"),
    ({k: v for k, v in METRICS.items() if k != "step"}, "without 'step'"),
    (METRICS | {"step": True}, "'step' is bool"),  # JSON true is no step
    (METRICS | {"step": 1 << 63}, "'step' is int"),  # beyond MLflow's 64 bits
    (METRICS | {"metrics": {"x/y": "0.5"}}, "not a number"),
    ({"kind": "artifact", "run_id": "r", "file": "files/a/b", "artifact_path": 3}, "'artifact_path' is int"),
    ({"kind": "inputs", "run_id": "r", "datasets": [{"dataset": {"name": "n", "digest": "d", "source_type": "local",
                                                                 "source": "s", "code": "x"}, "context": "training"}]},
     "not MLflow's dataset fields"),
])
def test_which_records_are_fit_to_send(record, problem):
    found = record_problem(record)
    assert (found is None) if problem is None else (problem in found), found
