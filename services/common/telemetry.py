"""Request ids, JSON logs and Prometheus RPC metrics.

Every RPC gets a request id (the caller's `x-request-id` metadata, or a fresh one) that is
echoed back in the `x-request-id` trailer, stored in a context variable, and stamped on
every log record emitted while the RPC runs, so one grep joins a client error to the
server's traceback. Metrics live in a CollectorRegistry passed in by the caller: tests and
the embedded all-in-one process can run several servers without clashing on a global.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from http.server import HTTPServer
from threading import Thread
from typing import Any

import grpc
from grpc import aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.common.config import Settings
from services.common.interceptors import (
    GuardInterceptor,
    is_infrastructure_method,
    metadata_value,
    status_code_of,
)

REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID_LEN = 128

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("atelier_request_id", default="")

log = logging.getLogger(__name__)


def current_request_id() -> str:
    """The id of the RPC being served in this context ('' outside an RPC)."""
    return _request_id.get()


def _clean_request_id(raw: str | None) -> str:
    """Accept a caller's id only if it is short printable ASCII; otherwise make one."""
    if raw and len(raw) <= _MAX_REQUEST_ID_LEN and raw.isascii() and raw.isprintable():
        return raw
    return uuid.uuid4().hex


# --- logging -------------------------------------------------------------------------------

class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record so formatters can always print it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = _request_id.get()
        return True


_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", ""),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(settings: Settings, stream: Any = None) -> logging.Handler:
    """Install one root handler (JSON or plain text) carrying the request-id filter.

    Returns the handler so callers (tests, embedded mode) can remove it again. Calling it
    twice replaces the handler it installed before rather than duplicating lines.
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_atelier", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._atelier = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler


@contextmanager
def timed_outcome(finish: Callable[[BaseException | None, float], None]) -> Iterator[None]:
    """Run the block, then always call `finish(error, seconds)`: what it raised (None when it
    returned) and how long it took. The error still propagates."""
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        finish(error, time.perf_counter() - started)


class RequestIdInterceptor(GuardInterceptor):
    """Outermost interceptor: sets the request id, echoes it, logs one line per RPC."""

    @asynccontextmanager
    async def guard(self, details: grpc.HandlerCallDetails,
                    context: aio.ServicerContext) -> AsyncIterator[None]:
        request_id = _clean_request_id(metadata_value(context, REQUEST_ID_KEY))
        token = _request_id.set(request_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))

        def finish(error: BaseException | None, seconds: float) -> None:
            code = status_code_of(context, error)
            # Probes and reflection would drown the access log; they stay visible at DEBUG.
            level = logging.DEBUG if is_infrastructure_method(details.method) else logging.INFO
            log.log(level, "rpc", extra={"rpc_method": details.method, "grpc_code": code.name,
                                         "duration_ms": round(seconds * 1000, 2)})
            with suppress(ValueError):  # a stream finished in another context: nothing to restore
                _request_id.reset(token)

        with timed_outcome(finish):
            yield


# --- metrics -------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0, 120.0, 300.0)


class RpcMetrics:
    """Per-RPC counters and latency, registered in an explicit registry.

    Other components (queue depth, caches, jobs) register their own collectors in the same
    `registry`, so one /metrics endpoint serves a whole process.
    """

    def __init__(self, registry: CollectorRegistry, namespace: str = "atelier") -> None:
        self.registry = registry
        self.requests = Counter("grpc_server_handled", "RPCs completed, by method and status code.",
                                ["grpc_method", "grpc_code"], namespace=namespace, registry=registry)
        self.latency = Histogram("grpc_server_handling_seconds", "RPC latency, by method and code.",
                                 ["grpc_method", "grpc_code"], namespace=namespace, registry=registry,
                                 buckets=_LATENCY_BUCKETS)
        self.in_flight = Gauge("grpc_server_in_flight", "RPCs being served now, by method.",
                               ["grpc_method"], namespace=namespace, registry=registry)

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method, code.name).observe(seconds)


class MetricsInterceptor(GuardInterceptor):
    """Counts and times every RPC by its final status code (after error mapping)."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.metrics = metrics

    @asynccontextmanager
    async def guard(self, details: grpc.HandlerCallDetails,
                    context: aio.ServicerContext) -> AsyncIterator[None]:
        method = details.method
        gauge = self.metrics.in_flight.labels(method)
        gauge.inc()

        def finish(error: BaseException | None, seconds: float) -> None:
            gauge.dec()
            self.metrics.observe(method, status_code_of(context, error), seconds)

        with timed_outcome(finish):
            yield


@dataclass
class MetricsHttp:
    """A running /metrics endpoint; `close()` stops it (tests, embedded shutdown)."""

    port: int
    server: HTTPServer
    thread: Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_http(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> MetricsHttp | None:
    """Serve `registry` on http://addr:port/metrics in a daemon thread; port 0 disables it."""
    if port <= 0:
        return None
    server, thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics endpoint listening", extra={"metrics_port": bound})
    return MetricsHttp(bound, server, thread)
