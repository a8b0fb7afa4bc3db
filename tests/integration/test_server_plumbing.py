"""The shared server plumbing, exercised through real loopback servers.

A test-only "Plumbing" service (raw bytes, no proto) covers the four RPC shapes plus the
writer style of response streams; its payload says what to do ("whoami", "invalid",
"slowstream:2", ...). A RegistryService servicer answering GetAdapter with NOT_FOUND gives
grpcurl and reflection a real atelier.v1 service to see.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from atelier.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from services.common import errors
from services.common.auth import current_tenant
from services.common.server import ServiceBinding
from services.common.telemetry import RpcMetrics, configure_logging, current_request_id, start_metrics_http
from tests.fixtures.grpc_servers import (
    ServerThread,
    bearer,
    loopback_settings,
    make_self_signed_cert,
    serve_bindings,
)

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


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(loopback_settings(), plumbing_bindings, metrics=RpcMetrics(CollectorRegistry())) as srv:
        yield srv


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> grpc.Channel:
    return server.channel()


# --- health and reflection ---------------------------------------------------------------

def test_health_serving_overall_and_per_service_via_grpcurl(server: ServerThread) -> None:
    for service in ["", "atelier.v1.RegistryService", PLUMBING]:
        out = grpcurl("-plaintext", "-d", json.dumps({"service": service}), server.target,
                      "grpc.health.v1.Health/Check")
        assert json.loads(out.stdout)["status"] == "SERVING", service


def test_reflection_lists_services_via_grpcurl(server: ServerThread) -> None:
    listed = grpcurl("-plaintext", server.target, "list").stdout.split()
    assert {"atelier.v1.RegistryService", PLUMBING, "grpc.health.v1.Health"} <= set(listed)
    described = grpcurl("-plaintext", server.target, "describe", "atelier.v1.RegistryService").stdout
    assert "rpc GetAdapter" in described


def test_unknown_health_service_is_not_found(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    err = rpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope.Service")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


# --- error mapping -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ERRORS))
def test_typed_error_maps_to_code_and_message(channel: grpc.Channel, name: str) -> None:
    err = rpc_error(lambda: call(channel, "unary", name.encode()))
    assert err.code() == EXPECTED_CODES[name]
    assert err.details() == ERRORS[name]().message
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None and status.code == EXPECTED_CODES[name].value[0]


def test_error_details_decode(channel: grpc.Channel) -> None:
    bad = details_of(rpc_error(lambda: call(channel, "unary", b"invalid")))["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == [("spec.rank", "must be in 1..128")]
    info = details_of(rpc_error(lambda: call(channel, "unary", b"notfound")))["ResourceInfo"]
    assert (info.resource_type, info.resource_name) == ("adapter", "cat-toy")
    retry = details_of(rpc_error(lambda: call(channel, "unary", b"unavailable")))["RetryInfo"]
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(2.5)
    retry = details_of(rpc_error(lambda: call(channel, "unary", b"exhausted")))["RetryInfo"]
    assert retry.retry_delay.ToTimedelta().total_seconds() == pytest.approx(0.25)
    pre = details_of(rpc_error(lambda: call(channel, "unary", b"precondition")))
    assert pre["BadRequest"].field_violations[0].field == "adapters[0].ref"
    assert pre["PreconditionFailure"].violations[0].type == "STATE"
    conflict = details_of(rpc_error(lambda: call(channel, "unary", b"conflict")))
    assert conflict["PreconditionFailure"].violations[0].type == "CONFLICT"


def test_generated_servicer_error_reaches_client_with_resource_info(channel: grpc.Channel) -> None:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    req = registry_pb2.GetAdapterRequest(ref=common_pb2.AdapterRef(name="ghost"))
    err = rpc_error(lambda: stub.GetAdapter(req))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert details_of(err)["ResourceInfo"].resource_name == "ghost"
    unimplemented = rpc_error(lambda: stub.ListAdapters(registry_pb2.ListAdaptersRequest()))
    assert unimplemented.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("shape", SHAPES)
def test_errors_mapped_in_every_rpc_shape(channel: grpc.Channel, shape: str) -> None:
    err = rpc_error(lambda: call(channel, shape, b"invalid"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(err)["BadRequest"].field_violations[0].field == "spec.rank"
    err = rpc_error(lambda: call(channel, shape, b"unavailable"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert "RetryInfo" in details_of(err)


@pytest.mark.parametrize("shape", SHAPES)
def test_unexpected_error_is_internal_without_internals_and_server_survives(
        channel: grpc.Channel, shape: str, caplog: pytest.LogCaptureFixture) -> None:
    err = rpc_error(lambda: call(channel, shape, b"boom", metadata=(("x-request-id", "req-boom-1"),)))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (err.details() or "") and "RuntimeError" not in (err.details() or "")
    assert "req-boom-1" in (err.details() or "")
    assert details_of(err)["RequestInfo"].request_id == "req-boom-1"
    assert call(channel, shape, b"ping")[0] == b"ping"  # still serving


def test_unexpected_error_is_logged_with_traceback(channel: grpc.Channel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rpc_error(lambda: call(channel, "unary", b"boom"))
    logged = [r for r in caplog.records if r.exc_info and "hunter2" in str(r.exc_info[1])]
    assert logged, "the traceback of an unexpected error must be logged server-side"


# --- request ids and logs ------------------------------------------------------------------

def test_request_id_is_propagated_echoed_and_generated(channel: grpc.Channel) -> None:
    fn = channel.unary_unary(f"/{PLUMBING}/Unary", None, None)
    response, call_ = fn.with_call(b"request-id", metadata=(("x-request-id", "abc-123"),))
    assert response == b"abc-123"
    assert trailers(call_)["x-request-id"] == "abc-123"
    response, call_ = fn.with_call(b"request-id")
    echoed = trailers(call_)["x-request-id"]
    assert len(response) == 32 and response.decode() == echoed
    err = rpc_error(lambda: fn(b"notfound", metadata=(("x-request-id", "abc-456"),)))
    assert trailers(err)["x-request-id"] == "abc-456"


def test_json_log_lines_carry_the_request_id(channel: grpc.Channel) -> None:
    stream = io.StringIO()
    handler = configure_logging(loopback_settings(log_json=True, log_level="INFO"), stream=stream)
    try:
        call(channel, "unary", b"log:hello", metadata=(("x-request-id", "rid-log-1"),))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    said = [line for line in lines if line["msg"] == "servicer says hello"]
    assert said and said[0]["request_id"] == "rid-log-1"
    access = [line for line in lines if line["msg"] == "rpc" and line["request_id"] == "rid-log-1"]
    assert access and access[0]["grpc_code"] == "OK" and access[0]["rpc_method"].endswith("/Unary")


# --- auth ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server() -> Iterator[ServerThread]:
    settings = loopback_settings(auth_enabled=True, api_keys="key-a=tenant-a,key-b=tenant-b")
    with ServerThread(settings, plumbing_bindings) as srv:
        yield srv


@pytest.mark.parametrize("shape", SHAPES)
def test_auth_rejects_missing_and_unknown_keys(auth_server: ServerThread, shape: str) -> None:
    channel = auth_server.channel()
    for metadata in [(), bearer("key-z"), (("authorization", "Basic key-a"),),
                     (("authorization", "Bearer "),), bearer("key-a" + "x")]:
        err = rpc_error(lambda md=metadata: call(channel, shape, b"whoami", metadata=md))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata


@pytest.mark.parametrize("shape", SHAPES)
def test_auth_good_key_sets_tenant_for_every_shape(auth_server: ServerThread, shape: str) -> None:
    channel = auth_server.channel()
    assert set(call(channel, shape, b"whoami", metadata=bearer("key-a"))) == {b"tenant-a"}
    assert set(call(channel, shape, b"whoami", metadata=bearer("key-b"))) == {b"tenant-b"}


def test_auth_keys_file_is_read(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# mounted secret\nfile-key=tenant-f\n")
    settings = loopback_settings(auth_enabled=True, api_keys_file=keys)
    with serve_bindings(settings, plumbing_bindings) as (_, channel):
        assert call(channel, "unary", b"whoami", metadata=bearer("file-key")) == [b"tenant-f"]


def test_health_and_reflection_open_without_key(auth_server: ServerThread) -> None:
    out = grpcurl("-plaintext", auth_server.target, "grpc.health.v1.Health/Check")
    assert json.loads(out.stdout)["status"] == "SERVING"
    assert "atelier.v1.RegistryService" in grpcurl("-plaintext", auth_server.target, "list").stdout
    denied = grpcurl("-plaintext", "-d", "{}", auth_server.target, "atelier.v1.RegistryService/GetAdapter",
                     check=False)
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr


def test_auth_off_uses_default_tenant() -> None:
    with serve_bindings(loopback_settings(default_tenant="solo"), plumbing_bindings) as (_, channel):
        assert call(channel, "bidi", b"whoami") == [b"solo"]
        assert call(channel, "unary", b"whoami", metadata=bearer("anything")) == [b"solo"]


# --- metrics -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_metrics_endpoint_counts_rpcs_by_code() -> None:
    registry = CollectorRegistry()
    http = start_metrics_http(registry, free_port(), addr="127.0.0.1")
    assert http is not None
    try:
        with serve_bindings(loopback_settings(), plumbing_bindings, metrics=RpcMetrics(registry)) as (_, channel):
            call(channel, "unary", b"ping")
            rpc_error(lambda: call(channel, "unary", b"notfound"))
            rpc_error(lambda: call(channel, "server_stream", b"exhausted"))
        body = urllib.request.urlopen(f"http://127.0.0.1:{http.port}/metrics", timeout=10).read().decode()
    finally:
        http.close()
    unary = f'grpc_method="/{PLUMBING}/Unary"'
    assert f'atelier_grpc_server_handled_total{{grpc_code="OK",{unary}}} 1.0' in body
    assert f'atelier_grpc_server_handled_total{{grpc_code="NOT_FOUND",{unary}}} 1.0' in body
    assert 'grpc_code="RESOURCE_EXHAUSTED",grpc_method="/atelier.test.Plumbing/ServerStream"' in body
    assert f'atelier_grpc_server_handling_seconds_count{{grpc_code="OK",{unary}}} 1.0' in body
    assert f"atelier_grpc_server_in_flight{{{unary}}} 0.0" in body


def test_metrics_port_zero_disables() -> None:
    assert start_metrics_http(CollectorRegistry(), 0) is None


# --- graceful shutdown ---------------------------------------------------------------------

def start_slow_stream(channel: grpc.Channel, seconds: float) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a stream that answers 'started' at once and 'done' after `seconds`."""
    result: dict[str, Any] = {}
    stream: Any = channel.unary_stream(f"/{PLUMBING}/ServerStream", None, None)(f"slowstream:{seconds}".encode())
    assert next(stream) == b"started"

    def finish() -> None:
        try:
            result["messages"] = list(stream)
        except grpc.RpcError as err:
            result["error"] = err.code()

    thread = threading.Thread(target=finish)
    thread.start()
    return thread, result


def test_graceful_stop_finishes_in_flight_and_refuses_new_calls() -> None:
    srv = ServerThread(loopback_settings(), plumbing_bindings).start()
    try:
        channel = srv.channel()
        health = health_pb2_grpc.HealthStub(srv.channel())
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        thread, result = start_slow_stream(channel, 1.5)
        stopping = srv.submit(srv.running.stop(grace=10.0))  # type: ignore[union-attr]
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        time.sleep(0.2)
        with grpc.insecure_channel(srv.target) as fresh:
            err = rpc_error(lambda: call(fresh, "unary", b"ping", timeout=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        thread.join(timeout=15)
        assert result == {"messages": [b"done"]}
        stopping.result(timeout=15)
    finally:
        srv.stop()


def test_grace_period_bounds_in_flight_work() -> None:
    srv = ServerThread(loopback_settings(), plumbing_bindings).start()
    try:
        thread, result = start_slow_stream(srv.channel(), 30)
        started = time.monotonic()
        srv.run(srv.running.stop(grace=0.5))  # type: ignore[union-attr]
        thread.join(timeout=10)
        assert time.monotonic() - started < 5
        assert "error" in result and result["error"] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    finally:
        srv.stop()


SIGTERM_SERVER = """
import asyncio
from services.common.server import start_server, serve_until_signalled
from tests.fixtures.grpc_servers import loopback_settings
from tests.integration.test_server_plumbing import plumbing_bindings

async def main() -> None:
    settings = loopback_settings(shutdown_grace_seconds=10.0)
    running = await start_server(settings, plumbing_bindings(), 0)
    print(running.port, flush=True)
    await serve_until_signalled([running], settings.shutdown_grace_seconds)
    print("stopped", flush=True)

asyncio.run(main())
"""


def test_sigterm_drains_in_flight_rpc_then_exits_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SERVER], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            thread, result = start_slow_stream(channel, 1.5)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as fresh:
                err = rpc_error(lambda: call(fresh, "unary", b"ping", timeout=2))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            thread.join(timeout=15)
        assert result == {"messages": [b"done"]}
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read().strip() == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- TLS, limits, configuration errors -------------------------------------------------------

def test_tls_with_self_signed_cert(tmp_path: Path) -> None:
    cert, key = make_self_signed_cert(tmp_path)
    settings = loopback_settings(tls_cert_file=cert, tls_key_file=key)
    with ServerThread(settings, plumbing_bindings) as srv:
        assert srv.running is not None and srv.running.tls
        assert call(srv.channel(), "unary", b"ping") == [b"ping"]
        out = grpcurl("-cacert", str(cert), srv.target, "grpc.health.v1.Health/Check")
        assert json.loads(out.stdout)["status"] == "SERVING"
        with grpc.insecure_channel(srv.target) as plain:
            err = rpc_error(lambda: call(plain, "unary", b"ping", timeout=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_needs_both_files(tmp_path: Path) -> None:
    cert, _ = make_self_signed_cert(tmp_path)
    with pytest.raises(errors.InvalidInput) as info:
        ServerThread(loopback_settings(tls_cert_file=cert), plumbing_bindings).start()
    assert info.value.violations[0].field == "tls_key_file"


def test_max_message_size_is_enforced() -> None:
    with ServerThread(loopback_settings(grpc_max_message_bytes=4096), plumbing_bindings) as srv:
        assert call(srv.channel(), "unary", b"x" * 2000) == [b"x" * 2000]
        with grpc.insecure_channel(srv.target) as unlimited:
            err = rpc_error(lambda: call(unlimited, "unary", b"x" * 10_000))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_auth_enabled_without_keys_refuses_to_start() -> None:
    with pytest.raises(errors.InvalidInput):
        ServerThread(loopback_settings(auth_enabled=True), plumbing_bindings).start()


def test_port_in_use_fails_loudly(server: ServerThread) -> None:
    from services.common.server import start_server

    async def second() -> None:
        await start_server(loopback_settings(), [], server.port)

    with pytest.raises(OSError):
        asyncio.run(second())
