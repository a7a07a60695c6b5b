"""Records: which failures drop a record for good, and that an unknown kind is an error."""

from __future__ import annotations

import pytest
from mlflow.exceptions import RestException

from nin_dist.tracking.records import apply_record, refused


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


def test_an_unknown_record_kind_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown tracking record kind 'bogus'"):
        apply_record(None, {"kind": "bogus", "run_id": "a" * 32}, tmp_path)
