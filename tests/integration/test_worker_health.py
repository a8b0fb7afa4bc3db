"""`atelier worker` health over grpc.health.v1: readiness follows PostgreSQL and the registry.

A real worker subprocess reaches PostgreSQL and the S3 server through loopback TCP proxies
that the test cuts and restores, so the shared servers keep running for everyone else.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import Settings
from services.training.worker_health import WORKER_SERVICE
from tests.fixtures.s3 import free_port
from tests.fixtures.tcp_proxy import TcpProxy
from tests.integration.test_training_support import stack_settings, wait_for, worker_process

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _via(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{proxy.port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


@pytest.fixture
def proxies(postgres_url: str, s3_settings: Settings) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    db = TcpProxy(urlsplit(postgres_url).port or 5432).start()
    s3 = TcpProxy(urlsplit(s3_settings.s3_endpoint_url or "").port or 80).start()
    try:
        yield db, s3
    finally:
        db.cut()
        s3.cut()


def _status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    try:
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)
    except grpc.RpcError:
        return -1


def test_worker_readiness_flips_with_the_database_and_the_registry(
        tmp_path: Path, postgres_url: str, s3_settings: Settings, proxies: tuple[TcpProxy, TcpProxy]) -> None:
    db, s3 = proxies
    port = free_port()
    registry = s3_settings.model_copy(update={"s3_endpoint_url": _via(s3_settings.s3_endpoint_url or "", s3)})
    settings = stack_settings(tmp_path, registry, _via(postgres_url, db), worker_health_port=port,
                              worker_health_check_seconds=0.3)
    log = tmp_path / "worker.log"
    with worker_process(settings, "health-worker", log) as proc, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def becomes(service: str, want: int) -> None:
            try:
                wait_for(lambda: _status(stub, service), lambda s: s == want, timeout=90)
            except AssertionError:
                raise AssertionError(f"{service!r} never became {want}; log:\n{log.read_text()[-3000:]}") from None

        becomes(WORKER_SERVICE, SERVING)
        becomes("", SERVING)
        db.cut()
        becomes(WORKER_SERVICE, NOT_SERVING)
        assert _status(stub, "") == SERVING  # liveness does not follow the dependencies
        db.restore()
        becomes(WORKER_SERVICE, SERVING)
        s3.cut()
        becomes(WORKER_SERVICE, NOT_SERVING)
        s3.restore()
        becomes(WORKER_SERVICE, SERVING)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert "job store unreachable" in log.read_text() and "registry unreachable" in log.read_text()
