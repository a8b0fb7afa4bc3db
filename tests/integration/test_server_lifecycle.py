"""Server lifecycle: graceful stop and SIGTERM drain, TLS, message limits, bad config."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import errors
from services.common.server import start_server
from tests.fixtures.grpc_servers import ServerThread, loopback_settings, make_self_signed_cert
from tests.integration.plumbing_service import PLUMBING, REPO, call, grpcurl, plumbing_bindings, rpc_error

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
from tests.integration.plumbing_service import plumbing_bindings

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


def test_port_in_use_fails_loudly() -> None:
    async def second(port: int) -> None:
        await start_server(loopback_settings(), [], port)

    with ServerThread(loopback_settings(), plumbing_bindings) as srv, pytest.raises(OSError):
        asyncio.run(second(srv.port))


def test_per_service_health_can_be_switched(grpc_server: Any) -> None:
    srv = grpc_server(loopback_settings(), plumbing_bindings)
    health = health_pb2_grpc.HealthStub(srv.channel())

    def status(service: str) -> int:
        return int(health.Check(health_pb2.HealthCheckRequest(service=service)).status)

    srv.run(srv.running.set_serving(PLUMBING, False))
    assert status(PLUMBING) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status("atelier.v1.RegistryService") == health_pb2.HealthCheckResponse.SERVING
    srv.run(srv.running.set_serving(PLUMBING, True))
    assert status(PLUMBING) == health_pb2.HealthCheckResponse.SERVING
