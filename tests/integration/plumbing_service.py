"""A test-only service for the server-plumbing tests, plus client helpers.

"atelier.test.Plumbing" (raw bytes, no proto) covers the four RPC shapes plus the writer
style of response streams; the request payload says what to do ("whoami", "invalid",
"slowstream:2", ...). A RegistryService servicer answering GetAdapter with NOT_FOUND gives
grpcurl and reflection a real atelier.v1 service to see. Not a test module itself; the
SIGTERM test also imports it in a child process.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier_api.v1 import registry_pb2, registry_pb2_grpc
from services.common import errors
from services.common.auth import current_tenant
from services.common.server import ServiceBinding
from services.common.telemetry import current_request_id

REPO = Path(__file__).resolve().parents[2]
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
PLUMBING = "atelier.test.Plumbing"
SHAPES = ["unary", "server_stream", "writer_stream", "client_stream", "bidi"]
log = logging.getLogger("tests.plumbing")

ERRORS: dict[str, Callable[[], errors.AtelierError]] = {
    "invalid": lambda: errors.InvalidInput("spec.rank", "must be in 1..128"),
    "notfound": lambda: errors.AdapterNotFound("cat-toy"),
    "exists": lambda: errors.AlreadyExists("adapter", "cat-toy"),
    "precondition": lambda: errors.FailedPrecondition("trained on another base", "adapters[0].ref"),
    "conflict": lambda: errors.PreconditionConflict("alias moved"),
    "dataloss": lambda: errors.DataLoss("digest mismatch"),
    "unavailable": lambda: errors.Unavailable("object store unreachable", 2.5),
    "exhausted": lambda: errors.ResourceExhausted("queue full", 0.25),
    "unauthenticated": lambda: errors.Unauthenticated("nope"),
    "denied": lambda: errors.PermissionDenied("not yours"),
    "cancelled": lambda: errors.Cancelled("job cancelled"),
    "deadline": lambda: errors.DeadlineExceeded("too slow"),
}
EXPECTED_CODES = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT, "notfound": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS, "precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "conflict": grpc.StatusCode.FAILED_PRECONDITION, "dataloss": grpc.StatusCode.DATA_LOSS,
    "unavailable": grpc.StatusCode.UNAVAILABLE, "exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED, "denied": grpc.StatusCode.PERMISSION_DENIED,
    "cancelled": grpc.StatusCode.CANCELLED, "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
}


# --- test servicers -----------------------------------------------------------------------

async def act(payload: bytes) -> bytes:
    """What every Plumbing method does with one request payload."""
    command, _, arg = payload.decode().partition(":")
    if command == "whoami":
        return current_tenant().encode()
    if command == "request-id":
        return current_request_id().encode()
    if command == "log":
        log.info("servicer says %s", arg)
        return b"logged"
    if command == "slow":
        await asyncio.sleep(float(arg))
        return b"done"
    if command == "boom":
        raise RuntimeError("db password=hunter2")
    if command in ERRORS:
        raise ERRORS[command]()
    return payload


class Plumbing:
    async def unary(self, request: bytes, context: Any) -> bytes:
        return await act(request)

    async def server_stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        command, _, arg = request.decode().partition(":")
        if command == "slowstream":  # first message at once: the caller knows it is in flight
            yield b"started"
            await asyncio.sleep(float(arg))
            yield b"done"
            return
        for _ in range(2):
            yield await act(request)

    async def writer_stream(self, request: bytes, context: Any) -> None:
        for _ in range(2):
            await context.write(await act(request))

    async def client_stream(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        parts = [part async for part in requests]
        return await act(b"".join(parts))

    async def bidi(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for part in requests:
            yield await act(part)


class Registry(registry_pb2_grpc.RegistryServiceServicer):
    async def GetAdapter(self, request: registry_pb2.GetAdapterRequest, context: Any) -> Any:
        raise errors.AdapterNotFound(request.ref.name)


def plumbing_bindings() -> list[ServiceBinding]:
    svc = Plumbing()
    handler = grpc.method_handlers_generic_handler(PLUMBING, {
        "Unary": grpc.unary_unary_rpc_method_handler(svc.unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(svc.server_stream),
        "WriterStream": grpc.unary_stream_rpc_method_handler(svc.writer_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(svc.client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(svc.bidi),
    })
    registry = Registry()
    return [
        ServiceBinding(PLUMBING, lambda s: s.add_generic_rpc_handlers((handler,))),
        ServiceBinding("atelier.v1.RegistryService",
                       lambda s: registry_pb2_grpc.add_RegistryServiceServicer_to_server(registry, s)),
    ]


def call(channel: grpc.Channel, shape: str, payload: bytes, **kw: Any) -> list[bytes]:
    """Invoke one Plumbing shape with raw bytes; returns every response message."""
    if shape == "unary":
        return [channel.unary_unary(f"/{PLUMBING}/Unary", None, None)(payload, **kw)]
    if shape == "server_stream":
        return list(channel.unary_stream(f"/{PLUMBING}/ServerStream", None, None)(payload, **kw))
    if shape == "writer_stream":
        return list(channel.unary_stream(f"/{PLUMBING}/WriterStream", None, None)(payload, **kw))
    if shape == "client_stream":
        half = len(payload) // 2
        parts = iter([payload[:half], payload[half:]])
        return [channel.stream_unary(f"/{PLUMBING}/ClientStream", None, None)(parts, **kw)]
    return list(channel.stream_stream(f"/{PLUMBING}/Bidi", None, None)(iter([payload]), **kw))


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def details_of(err: grpc.RpcError) -> dict[str, Any]:
    """Decoded google.rpc details by type name."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin trailer"
    out: dict[str, Any] = {}
    for any_msg in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.ResourceInfo, error_details_pb2.RetryInfo,
                    error_details_pb2.PreconditionFailure, error_details_pb2.RequestInfo):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.DESCRIPTOR.name] = msg
    return out


def trailers(call_: Any) -> dict[str, Any]:
    return {key: value for key, value in call_.trailing_metadata()}


def grpcurl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30, check=check)
