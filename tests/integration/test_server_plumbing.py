"""The shared server plumbing through real loopback servers: health, reflection (checked
with grpcurl), error mapping in every RPC shape, request ids and JSON logs, auth, metrics."""

from __future__ import annotations

import io
import json
import logging
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry

from atelier_api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.telemetry import RpcMetrics, configure_logging, start_metrics_http
from tests.fixtures.grpc_servers import ServerThread, bearer, loopback_settings, serve_bindings
from tests.integration.plumbing_service import (
    ERRORS,
    EXPECTED_CODES,
    PLUMBING,
    SHAPES,
    call,
    details_of,
    grpcurl,
    plumbing_bindings,
    rpc_error,
    trailers,
)


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
    root = logging.getLogger()
    level = root.level
    handler = configure_logging(loopback_settings(log_json=True, log_level="INFO"), stream=stream)
    try:
        call(channel, "unary", b"log:hello", metadata=(("x-request-id", "rid-log-1"),))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
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


def test_auth_keys_file_is_read(tmp_path: Path, grpc_server: Callable[..., ServerThread]) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# mounted secret\nfile-key=tenant-f\n")
    srv = grpc_server(loopback_settings(auth_enabled=True, api_keys_file=keys), plumbing_bindings)
    assert call(srv.channel(), "unary", b"whoami", metadata=bearer("file-key")) == [b"tenant-f"]


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
