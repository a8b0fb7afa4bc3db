"""Typed domain errors -> gRPC status codes with google.rpc details, in one place.

Servicers and domain code raise `services.common.errors` exceptions and never call
`context.abort`; this interceptor turns them into a status code plus a serialized
`google.rpc.Status` in the `grpc-status-details-bin` trailer, which
`grpc_status.rpc_status.from_call` decodes on the client. The mapping is a table keyed by
exception class and resolved along the MRO, so a new subclass (AdapterNotFound) inherits
its parent's code without touching this module. Anything else is a bug: it is logged with
its traceback and answered INTERNAL with a generic message and the request id, so no
internals leak and the process keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from services.common import errors
from services.common.interceptors import GuardInterceptor
from services.common.telemetry import current_request_id

log = logging.getLogger(__name__)

STATUS_DETAILS_KEY = "grpc-status-details-bin"

DetailsBuilder = Callable[[errors.AtelierError], list[Message]]


@dataclass(frozen=True)
class Mapping:
    code: grpc.StatusCode
    details: DetailsBuilder


def _no_details(_: errors.AtelierError) -> list[Message]:
    return []


def _bad_request(exc: errors.AtelierError) -> list[Message]:
    assert isinstance(exc, errors.InvalidInput)
    violations = [error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                  for v in exc.violations]
    return [error_details_pb2.BadRequest(field_violations=violations)]


def _resource_info(exc: errors.AtelierError) -> list[Message]:
    assert isinstance(exc, errors.NotFound | errors.AlreadyExists)
    return [error_details_pb2.ResourceInfo(resource_type=exc.resource_type,
                                           resource_name=exc.resource_name, description=exc.message)]


def _precondition(exc: errors.AtelierError) -> list[Message]:
    assert isinstance(exc, errors.FailedPrecondition)
    kind = "CONFLICT" if isinstance(exc, errors.PreconditionConflict) else "STATE"
    out: list[Message] = [error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(type=kind, subject=exc.field_name,
                                                        description=exc.message)])]
    if exc.field_name:
        out.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field_name, description=exc.message)]))
    return out


def _retry_info(exc: errors.AtelierError) -> list[Message]:
    assert isinstance(exc, errors.Unavailable | errors.ResourceExhausted)
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(exc.retry_after_seconds, 0.0) * 1e9))
    out: list[Message] = [error_details_pb2.RetryInfo(retry_delay=delay)]
    if isinstance(exc, errors.ResourceExhausted) and exc.violations:
        out.append(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
            for v in exc.violations]))
    return out


ERROR_TABLE: dict[type[errors.AtelierError], Mapping] = {
    errors.InvalidInput: Mapping(grpc.StatusCode.INVALID_ARGUMENT, _bad_request),
    errors.NotFound: Mapping(grpc.StatusCode.NOT_FOUND, _resource_info),
    errors.AlreadyExists: Mapping(grpc.StatusCode.ALREADY_EXISTS, _resource_info),
    errors.FailedPrecondition: Mapping(grpc.StatusCode.FAILED_PRECONDITION, _precondition),
    errors.DataLoss: Mapping(grpc.StatusCode.DATA_LOSS, _no_details),
    errors.Unavailable: Mapping(grpc.StatusCode.UNAVAILABLE, _retry_info),
    errors.ResourceExhausted: Mapping(grpc.StatusCode.RESOURCE_EXHAUSTED, _retry_info),
    errors.Unauthenticated: Mapping(grpc.StatusCode.UNAUTHENTICATED, _no_details),
    errors.PermissionDenied: Mapping(grpc.StatusCode.PERMISSION_DENIED, _no_details),
    errors.Cancelled: Mapping(grpc.StatusCode.CANCELLED, _no_details),
    errors.DeadlineExceeded: Mapping(grpc.StatusCode.DEADLINE_EXCEEDED, _no_details),
    errors.AtelierError: Mapping(grpc.StatusCode.UNKNOWN, _no_details),
}


def mapping_for(exc: errors.AtelierError) -> Mapping:
    """The table entry of the nearest mapped class in the exception's MRO."""
    for cls in type(exc).__mro__:
        entry = ERROR_TABLE.get(cls)
        if entry is not None:
            return entry
    return ERROR_TABLE[errors.AtelierError]


def to_rpc_status(code: grpc.StatusCode, message: str, details: list[Message]) -> status_pb2.Status:
    """Build the google.rpc.Status sent in the `grpc-status-details-bin` trailer."""
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def status_for_error(exc: errors.AtelierError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """Code and rich status for a typed error (exposed for tests and non-gRPC callers)."""
    entry = mapping_for(exc)
    return entry.code, to_rpc_status(entry.code, exc.message, entry.details(exc))


def internal_status(request_id: str) -> status_pb2.Status:
    message = f"internal error; request id {request_id}" if request_id else "internal error"
    info = error_details_pb2.RequestInfo(request_id=request_id)
    return to_rpc_status(grpc.StatusCode.INTERNAL, message, [info])


async def abort_with(context: aio.ServicerContext, code: grpc.StatusCode,
                     status: status_pb2.Status) -> None:
    """Abort keeping trailers already set (x-request-id) next to the status details."""
    existing = [(k, v) for k, v in (context.trailing_metadata() or ()) if k != STATUS_DETAILS_KEY]
    trailers = (*existing, (STATUS_DETAILS_KEY, status.SerializeToString()))
    await context.abort(code, status.message, trailers)


class ErrorMappingInterceptor(GuardInterceptor):
    """Catches errors raised by the behaviour of every RPC shape and aborts properly."""

    @asynccontextmanager
    async def guard(self, details: grpc.HandlerCallDetails,
                    context: aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except aio.AbortError:
            raise  # already a deliberate status (a behaviour or inner interceptor aborted)
        except errors.AtelierError as exc:
            code, status = status_for_error(exc)
            extra = {"rpc_method": details.method, "grpc_code": code.name, "error": exc.message}
            if isinstance(exc, errors.Unavailable) and exc.detail:
                extra["detail"] = exc.detail  # internal (endpoint, bucket, key): logged, never sent
            log.info("rpc failed", extra=extra)
            await abort_with(context, code, status)
        except Exception:
            preset = context.code()
            if isinstance(preset, grpc.StatusCode) and preset is not grpc.StatusCode.OK:
                # A deliberate status set before raising, e.g. the generated base servicer's
                # UNIMPLEMENTED + NotImplementedError for methods a servicer does not override.
                message = str(context.details() or preset.name.lower())
                await abort_with(context, preset, to_rpc_status(preset, message, []))
            request_id = current_request_id()
            log.exception("unexpected error in rpc", extra={"rpc_method": details.method})
            await abort_with(context, grpc.StatusCode.INTERNAL, internal_status(request_id))

