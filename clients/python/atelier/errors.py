"""Typed SDK exceptions that carry the google.rpc details a server attached.

A caller can catch `InvalidArgumentError` and read `e.field_violations` instead of parsing
status strings; `RetryableError`s say how long the server asked the caller to wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class AtelierRpcError(Exception):
    """A failed call: gRPC status code, message and decoded details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: tuple[FieldViolation, ...] = (),
        resource_type: str = "",
        resource_name: str = "",
        retry_delay_seconds: float | None = None,
        request_id: str = "",
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field_violations = field_violations
        self.resource_type = resource_type
        self.resource_name = resource_name
        self.retry_delay_seconds = retry_delay_seconds
        self.request_id = request_id

    @property
    def field(self) -> str:
        """The first offending field, or "" when the server named none."""
        return self.field_violations[0].field if self.field_violations else ""


class InvalidArgumentError(AtelierRpcError):
    pass


class NotFoundError(AtelierRpcError):
    pass


class AlreadyExistsError(AtelierRpcError):
    pass


class FailedPreconditionError(AtelierRpcError):
    pass


class DataLossError(AtelierRpcError):
    pass


class UnauthenticatedError(AtelierRpcError):
    pass


class PermissionDeniedError(AtelierRpcError):
    pass


class RetryableError(AtelierRpcError):
    """The server is busy or a dependency is down; the call may succeed later."""


class UnavailableError(RetryableError):
    pass


class ResourceExhaustedError(RetryableError):
    pass


class DeadlineExceededError(AtelierRpcError):
    pass


class CancelledError(AtelierRpcError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[AtelierRpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
}

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def _metadata_value(pairs: object, key: str) -> bytes | str | None:
    for item in pairs or ():  # type: ignore[attr-defined]
        if item[0] == key:
            return item[1]  # type: ignore[no-any-return]
    return None


def _decode_details(raw: bytes | str | None, kwargs: dict[str, object]) -> None:
    if not isinstance(raw, bytes):
        return
    status = status_pb2.Status.FromString(raw)
    for any_detail in status.details:
        bad = error_details_pb2.BadRequest()
        info = error_details_pb2.ResourceInfo()
        retry = error_details_pb2.RetryInfo()
        if any_detail.Unpack(bad):
            kwargs["field_violations"] = tuple(
                FieldViolation(v.field, v.description) for v in bad.field_violations
            )
        elif any_detail.Unpack(info):
            kwargs["resource_type"] = info.resource_type
            kwargs["resource_name"] = info.resource_name
        elif any_detail.Unpack(retry):
            kwargs["retry_delay_seconds"] = retry.retry_delay.ToTimedelta().total_seconds()


def from_grpc_error(error: grpc.RpcError) -> AtelierRpcError:
    """Translate a grpc error (sync or aio) into the matching typed SDK exception."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    message: str = error.details() or ""  # type: ignore[attr-defined]
    trailers = error.trailing_metadata()  # type: ignore[attr-defined]
    kwargs: dict[str, object] = {}
    _decode_details(_metadata_value(trailers, "grpc-status-details-bin"), kwargs)
    request_id = _metadata_value(trailers, "x-request-id")
    kwargs["request_id"] = request_id if isinstance(request_id, str) else ""
    return _BY_CODE.get(code, AtelierRpcError)(code, message, **kwargs)  # type: ignore[arg-type]
