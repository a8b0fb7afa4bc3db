"""JSON <-> protobuf for the gateway, and gRPC status -> HTTP error bodies.

Requests are built as one proto3-JSON dict (body, then query parameters, then path variables,
later ones winning) and parsed once with `json_format.ParseDict`, so the JSON rules are exactly
protobuf's: lowerCamel or proto field names, enum names, base64 bytes, RFC 3339 timestamps.
Query and path values arrive as strings and are converted by the target field's type first.
Responses print every field (defaults included) under its proto name, so a client sees `[]`
and enum names rather than absent keys, spelled as in the .proto files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from services.gateway.routes import field_by_path

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# google/rpc/code.proto's HTTP mapping (what Envoy's transcoder and grpc-gateway use).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
_CODES_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

_INTEGER_TYPES = {FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64,
                  FieldDescriptor.CPPTYPE_UINT32, FieldDescriptor.CPPTYPE_UINT64}
_FLOAT_TYPES = {FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE}


class BadHttpRequest(Exception):
    """A request the gateway cannot turn into a proto; answered 400 INVALID_ARGUMENT."""

    def __init__(self, field: str, description: str) -> None:
        super().__init__(description)
        self.field = field
        self.description = description


def _scalar(field: FieldDescriptor, raw: str, name: str) -> Any:
    """A query/path string as the JSON value `field` expects (ints stay exact, bools spelled)."""
    try:
        if field.cpp_type in _INTEGER_TYPES:
            return int(raw)
        if field.cpp_type in _FLOAT_TYPES:
            return float(raw)
    except ValueError as exc:
        raise BadHttpRequest(name, f"{name}: {raw!r} is not a number") from exc
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise BadHttpRequest(name, f"{name}: {raw!r} is not true or false")
        return raw.lower() in ("true", "1")
    return raw  # strings, enum names, bytes (base64), well-known types in their JSON spelling


def _assign(target: dict[str, Any], message: Descriptor, name: str, values: list[str]) -> None:
    chain = field_by_path(message, name)
    if chain is None:
        raise BadHttpRequest(name, f"unknown parameter {name!r} for {message.full_name}")
    leaf = chain[-1]
    if leaf.message_type is not None and not leaf.message_type.full_name.startswith("google.protobuf."):
        raise BadHttpRequest(name, f"{name} is a message; set its fields ({name}.<field>) instead")
    node = target
    for part in chain[:-1]:
        node = node.setdefault(part.name, {})
        if not isinstance(node, dict):
            raise BadHttpRequest(name, f"{name} conflicts with another parameter")
    converted = [_scalar(leaf, v, name) for v in values]
    node[leaf.name] = converted if leaf.is_repeated else converted[-1]


def build_request(cls: type[Message], body: Mapping[str, Any] | None,
                  query: Iterable[tuple[str, str]], variables: Mapping[str, str]) -> Message:
    """The request message from a JSON body, query parameters and path variables."""
    data: dict[str, Any] = dict(body or {})
    grouped: dict[str, list[str]] = {}
    for key, value in query:
        grouped.setdefault(key, []).append(value)
    descriptor = cast(Descriptor, cls.DESCRIPTOR)
    for key, values in grouped.items():
        _assign(data, descriptor, key, values)
    for key, value in variables.items():
        _assign(data, descriptor, key, [value])
    message = cls()
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as exc:
        raise BadHttpRequest("body", str(exc)) from exc
    return message


def to_json(message: Message) -> dict[str, Any]:
    """proto3 JSON with defaults printed (lists as [], enums by name) and proto field names
    (`next_page_token`, as in the .proto files and the SDK; input takes either spelling)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True)


def status_body(code: grpc.StatusCode, message: str, details: list[Message] | None = None) -> dict[str, Any]:
    """A google.rpc.Status as JSON: {"code", "message", "details": [{"@type": ...}]}."""
    status = status_pb2.Status(code=code.value[0], message=message)
    for detail in details or []:
        status.details.add().Pack(detail)
    return to_json(status)


def rpc_error_body(error: grpc.RpcError) -> tuple[int, dict[str, Any], float | None]:
    """(HTTP status, Status JSON, Retry-After seconds) for a failed call, keeping its details."""
    call: Any = error  # aio and sync call errors both expose code/details/trailing_metadata
    status = status_pb2.Status(code=call.code().value[0], message=call.details() or "")
    trailers: Any = call.trailing_metadata() or ()
    for key, value in trailers:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    body = to_json(status)
    return http_status(status), body, retry_after(status)


def http_status(status: status_pb2.Status) -> int:
    """The standard mapping, except a compare-and-swap miss (PreconditionFailure CONFLICT) is 412.

    google's table sends every FAILED_PRECONDITION to 400; an HTTP client that moves an alias
    with `expectedVersion` expects 412 Precondition Failed for "someone else moved it", the
    If-Match answer, while a wrong-state precondition (cancel a finished job) stays 400.
    """
    code = _CODES_BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        for detail in status.details:
            failure = error_details_pb2.PreconditionFailure()
            if detail.Unpack(failure) and any(v.type == "CONFLICT" for v in failure.violations):
                return 412
    return HTTP_STATUS[code]


def retry_after(status: status_pb2.Status) -> float | None:
    """RetryInfo's delay, for a Retry-After header on 429/503."""
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    return None
