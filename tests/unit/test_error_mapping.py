"""The error table: every typed domain error has its status code and google.rpc details."""

from __future__ import annotations

import inspect
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from services.common import errors
from services.common.error_mapping import ERROR_TABLE, internal_status, mapping_for, status_for_error

EXPECTED = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AdapterNotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PreconditionConflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def sample(cls: type[errors.AtelierError]) -> errors.AtelierError:
    """One instance of each error class, whatever its constructor wants."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.default is inspect.Parameter.empty
              and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cls(*[f"arg{i}" for i in range(len(params))])


def unpack(status_details: list[Any], cls: Any) -> list[Any]:
    out = []
    for any_msg in status_details:
        if any_msg.Is(cls.DESCRIPTOR):
            msg = cls()
            any_msg.Unpack(msg)
            out.append(msg)
    return out


def test_every_domain_error_class_has_a_specific_code() -> None:
    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.AtelierError) and c is not errors.AtelierError]
    assert set(classes) == set(EXPECTED), "a new error class needs an EXPECTED entry (and maybe a table row)"
    for cls in classes:
        assert mapping_for(sample(cls)).code == EXPECTED[cls], cls.__name__


def test_subclasses_inherit_their_parents_mapping() -> None:
    class BaseModelMismatch(errors.FailedPrecondition):
        pass

    code, status = status_for_error(BaseModelMismatch("adapter trained on sd15", "adapters[1].ref"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert unpack(list(status.details), error_details_pb2.BadRequest)[0].field_violations[0].field == "adapters[1].ref"


def test_bare_atelier_error_is_unknown() -> None:
    assert status_for_error(errors.AtelierError("odd"))[0] == grpc.StatusCode.UNKNOWN


def test_table_has_no_if_chain_gaps() -> None:
    assert all(issubclass(cls, errors.AtelierError) for cls in ERROR_TABLE)


def test_invalid_input_lists_every_violation() -> None:
    exc = errors.InvalidInput("images[0]", "not an image", errors.FieldViolation("images[3]", "truncated"))
    _, status = status_for_error(exc)
    bad = unpack(list(status.details), error_details_pb2.BadRequest)[0]
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("images[0]", "not an image"), ("images[3]", "truncated")]
    assert status.message == "images[0]: not an image"


def test_not_found_and_already_exists_carry_resource_info() -> None:
    for exc in (errors.AdapterNotFound("cat-toy@3"), errors.AlreadyExists("dataset", "ds-1")):
        _, status = status_for_error(exc)
        info = unpack(list(status.details), error_details_pb2.ResourceInfo)[0]
        assert info.resource_name in ("cat-toy@3", "ds-1") and info.resource_type in ("adapter", "dataset")


@pytest.mark.parametrize(("exc", "seconds"), [
    (errors.Unavailable("s3 down", 1.5), 1.5),
    (errors.ResourceExhausted("queue full", 0.1), 0.1),
    (errors.ResourceExhausted("queue full", -3), 0.0),
])
def test_retry_info_delay(exc: errors.AtelierError, seconds: float) -> None:
    _, status = status_for_error(exc)
    retry = unpack(list(status.details), error_details_pb2.RetryInfo)[0]
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(seconds)


def test_quota_exceeded_carries_quota_failure_and_retry_info() -> None:
    _, status = status_for_error(errors.QuotaExceeded("acme", "queued training jobs: limit 2", 7.5))
    failure = unpack(list(status.details), error_details_pb2.QuotaFailure)[0]
    assert [(v.subject, v.description) for v in failure.violations] == [
        ("tenant:acme", "queued training jobs: limit 2")]
    retry = unpack(list(status.details), error_details_pb2.RetryInfo)[0]
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(7.5)
    plain = status_for_error(errors.ResourceExhausted("queue full"))[1]
    assert not unpack(list(plain.details), error_details_pb2.QuotaFailure)


def test_precondition_without_field_has_no_bad_request() -> None:
    _, status = status_for_error(errors.PreconditionConflict("alias moved"))
    assert not unpack(list(status.details), error_details_pb2.BadRequest)
    assert unpack(list(status.details), error_details_pb2.PreconditionFailure)[0].violations[0].type == "CONFLICT"


def test_internal_status_says_nothing_but_the_request_id() -> None:
    status = internal_status("rid-9")
    assert status.code == grpc.StatusCode.INTERNAL.value[0]
    assert status.message == "internal error; request id rid-9"
    assert unpack(list(status.details), error_details_pb2.RequestInfo)[0].request_id == "rid-9"
