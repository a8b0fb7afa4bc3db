"""The loopback fault proxy itself, against a tiny real HTTP server: every fault does what it says."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.fixtures.fault_proxy import FaultProxy, via
from tests.fixtures.s3 import LOOPBACK


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = ThreadingHTTPServer((LOOPBACK, 0), _Hello)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    with FaultProxy(server.server_address[1], max_connections=4) as fp:
        yield fp
    server.shutdown()
    server.server_close()


def _get(proxy: FaultProxy, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    conn = conn or http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5)
    conn.request("GET", "/")
    response = conn.getresponse()
    return response.status, response.read()


def test_forwards_and_adds_latency(proxy: FaultProxy) -> None:
    assert _get(proxy) == (200, b"hello")
    proxy.latency(0.3)
    started = time.monotonic()
    assert _get(proxy) == (200, b"hello")
    assert time.monotonic() - started >= 0.3  # at least one delayed chunk


def test_http_error_answers_the_status_then_heals(proxy: FaultProxy) -> None:
    proxy.http_error(503)
    status, body = _get(proxy)
    assert status == 503 and b"ServiceUnavailable" in body
    proxy.heal()
    assert _get(proxy) == (200, b"hello")


def test_reset_breaks_open_connections_only(proxy: FaultProxy) -> None:
    conn = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5)
    assert _get(proxy, conn)[0] == 200
    proxy.reset()
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        _get(proxy, conn)
    assert _get(proxy) == (200, b"hello")


def test_outage_refuses_and_restart_heals_itself(proxy: FaultProxy) -> None:
    proxy.outage()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, proxy.port), timeout=2)
    proxy.heal()
    assert _get(proxy)[0] == 200
    proxy.restart(0.5)
    assert not proxy.listening
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, proxy.port), timeout=2)
    deadline = time.monotonic() + 5
    while not proxy.listening and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _get(proxy)[0] == 200


def test_connection_count_is_bounded(proxy: FaultProxy) -> None:
    held = [http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=5) for _ in range(2)]
    for conn in held:  # 2 client connections = 4 forwarded sockets = the bound
        assert _get(proxy, conn)[0] == 200
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        _get(proxy)
    assert proxy.refused >= 1
    for conn in held:
        conn.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if _get(proxy)[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException, OSError):
            time.sleep(0.05)
    else:
        raise AssertionError("the proxy never freed the closed connections")


def test_via_rewrites_only_the_host() -> None:
    fp = FaultProxy(5432)
    assert via("postgresql+psycopg://postgres@127.0.0.1:5432/db", fp) == \
        f"postgresql+psycopg://postgres@127.0.0.1:{fp.port}/db"
    assert via("http://127.0.0.1:9000", fp) == f"http://127.0.0.1:{fp.port}"
