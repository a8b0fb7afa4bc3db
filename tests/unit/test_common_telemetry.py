"""JSON logging, request ids and metric registries, without a server."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.common.config import Settings
from services.common.telemetry import RpcMetrics, _clean_request_id, _request_id, configure_logging


@pytest.fixture(autouse=True)
def restore_root_logging() -> Iterator[None]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.setLevel(level)
    root.handlers[:] = handlers


def test_request_id_from_caller_is_kept_only_when_sane() -> None:
    assert _clean_request_id("abc-123") == "abc-123"
    for bad in (None, "", "x" * 500, "bad\nline", "caf\u00e9"):
        generated = _clean_request_id(bad)
        assert generated != bad and len(generated) == 32


def test_json_lines_with_request_id_extras_and_traceback() -> None:
    stream = io.StringIO()
    handler = configure_logging(Settings.model_validate({"log_json": True, "log_level": "DEBUG"}), stream=stream)
    token = _request_id.set("rid-1")
    try:
        logger = logging.getLogger("tests.telemetry")
        logger.info("hello %s", "world", extra={"job_id": "j1", "obj": object()})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    finally:
        _request_id.reset(token)
        logging.getLogger().removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["request_id"] == "rid-1" and first["job_id"] == "j1"
    assert first["level"] == "INFO" and first["logger"] == "tests.telemetry" and "obj" in first
    assert "ValueError: bad" in second["exc"]


def test_configure_logging_twice_keeps_one_handler_and_supports_text() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    configure_logging(Settings.model_validate({"log_json": True}))
    handler = configure_logging(Settings.model_validate({"log_json": False, "log_level": "INFO"}), stream=stream)
    try:
        assert sum(1 for h in root.handlers if getattr(h, "_atelier", False)) == 1
        logging.getLogger("tests.telemetry").warning("plain")
        assert "WARNING tests.telemetry [] plain" in stream.getvalue()
    finally:
        root.removeHandler(handler)


def test_metrics_use_only_the_registry_they_are_given() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    RpcMetrics(first).observe("/a.B/C", grpc.StatusCode.OK, 0.01)
    RpcMetrics(second)  # a second server in the same process does not clash
    labels = {"grpc_method": "/a.B/C", "grpc_code": "OK"}
    assert first.get_sample_value("atelier_grpc_server_handled_total", labels) == 1.0
    assert second.get_sample_value("atelier_grpc_server_handled_total", labels) is None
