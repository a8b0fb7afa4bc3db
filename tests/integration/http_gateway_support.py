"""Shared pieces of the HTTP gateway tests: a runtime on its own event loop, the Env handle
with small request helpers, an SSE parser, Status-shape assertions and the dataset form."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_client import CollectorRegistry

from atelier.demo_images import concept_images
from services.common.config import Settings
from services.runtime import Runtime, start_runtime

KEYS = "key-acme=acme,key-beta=beta,key-ops=ops"
ACME, BETA = {"Authorization": "Bearer key-acme"}, {"Authorization": "Bearer key-beta"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Env:
    base: str
    settings: Settings
    loop: asyncio.AbstractEventLoop
    metrics: CollectorRegistry

    def url(self, path: str) -> str:
        return self.base + path

    def get(self, path: str, headers: dict[str, str] | None = None, **kw: Any) -> requests.Response:
        return requests.get(self.url(path), headers=ACME if headers is None else headers, timeout=120, **kw)

    def send(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             **kw: Any) -> requests.Response:
        return requests.request(method, self.url(path), json=body, headers=ACME if headers is None else headers,
                                timeout=120, **kw)


def sse_events(response: requests.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event type, data) for each Server-Sent Event of a streamed response."""
    events, kind, data = [], "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            events.append((kind, json.loads("\n".join(data))))
            kind, data = "message", []
    return events


def assert_status(response: requests.Response, http: int, code: int) -> dict[str, Any]:
    """The body is a google.rpc.Status JSON with `code` and the HTTP status matches."""
    assert response.status_code == http, (response.status_code, response.text)
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code and isinstance(body["message"], str) and isinstance(body["details"], list), body
    return body


def detail_types(body: dict[str, Any]) -> set[str]:
    return {d["@type"].rsplit(".", 1)[-1] for d in body["details"]}


@contextmanager
def running(settings: Settings, role: str) -> Iterator[Env]:
    """`start_runtime(settings, role)` on a private event loop thread; closed on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    metrics = CollectorRegistry()
    try:
        runtime: Runtime = asyncio.run_coroutine_threadsafe(start_runtime(settings, role, metrics), loop).result(120)
        assert runtime.gateway is not None
        try:
            yield Env(f"http://127.0.0.1:{runtime.gateway.port}", settings, loop, metrics)
        finally:
            asyncio.run_coroutine_threadsafe(runtime.close(0), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def wait_in_flight(env: Env, method: str, at_least: float = 1, timeout: float = 10.0) -> None:
    """Wait until the metrics count `at_least` RPCs of `method` in flight (accounting is async)."""
    deadline = time.monotonic() + timeout
    while in_flight(env, method) < at_least:
        assert time.monotonic() < deadline, f"{method} never reached {at_least} in flight"
        time.sleep(0.02)


def in_flight(env: Env, method: str) -> float:
    """RPCs of `method` (/pkg.Service/Method) being served now, from the process's metrics."""
    value = env.metrics.get_sample_value("atelier_grpc_server_in_flight", {"grpc_method": method})
    return value or 0.0


def upload_form(n: int) -> list[tuple[str, Any]]:
    """multipart fields: the header's name, then caption + image pairs (caption before its file)."""
    form: list[tuple[str, Any]] = [("name", (None, "toy"))]
    for i, image in enumerate(concept_images(n, seed=3)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        form += [("caption", (None, f"a photo of sks toy {i}")), ("image", (f"img{i}.png", buffer.getvalue()))]
    return form
