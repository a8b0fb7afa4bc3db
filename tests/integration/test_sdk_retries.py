"""The SDK against a real gRPC server that refuses, then recovers: retries, RetryInfo, typed errors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from atelier import AsyncClient, Client, InvalidArgumentError, RetryPolicy, UnavailableError
from atelier_api.v1 import inference_pb2, inference_pb2_grpc
from services.common.errors import InvalidInput, Unavailable
from services.common.server import ServiceBinding
from tests.fixtures.grpc_servers import loopback_settings, serve_bindings

FAST = RetryPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05, max_attempts=5)


class FlakyInference(inference_pb2_grpc.InferenceServiceServicer):
    """Fails `failures` times with UNAVAILABLE (asking for `retry_after`), then answers."""

    def __init__(self, failures: int, retry_after: float = 0.0) -> None:
        self.failures = failures
        self.retry_after = retry_after
        self.calls: list[float] = []
        self.metadata: list[dict[str, str]] = []

    async def Generate(self, request: inference_pb2.GenerateRequest, context: Any) -> inference_pb2.GenerateResponse:
        self.calls.append(time.monotonic())
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        if not request.spec.prompt:
            raise InvalidInput("spec.prompt", "must not be empty")
        if len(self.calls) <= self.failures:
            raise Unavailable("registry unreachable", retry_after_seconds=self.retry_after)
        return inference_pb2.GenerateResponse(batch_size=1)


def _bindings(servicer: FlakyInference) -> Any:
    def factory() -> list[ServiceBinding]:
        return [ServiceBinding("atelier.v1.InferenceService",
                               lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s))]
    return factory


def test_sync_client_retries_unavailable_until_the_server_recovers() -> None:
    servicer = FlakyInference(failures=2)
    with serve_bindings(loopback_settings(), _bindings(servicer)) as (port, _):
        with Client(f"127.0.0.1:{port}", retry=FAST) as client:
            result = client.generate("a dog", base_model="tiny-sd", adapters=["dog@2=0.8", "style"])
    assert result.raw.batch_size == 1
    assert len(servicer.calls) == 3
    assert servicer.metadata[-1]["x-atelier-adapters"] == "dog@2,style"
    assert servicer.metadata[-1]["x-request-id"]


def test_retry_waits_at_least_what_retry_info_asks() -> None:
    servicer = FlakyInference(failures=1, retry_after=0.3)
    with serve_bindings(loopback_settings(), _bindings(servicer)) as (port, _):
        with Client(f"127.0.0.1:{port}", retry=FAST) as client:
            client.generate("a dog", base_model="tiny-sd")
    assert servicer.calls[1] - servicer.calls[0] >= 0.3


def test_gives_up_after_max_attempts_with_typed_error() -> None:
    servicer = FlakyInference(failures=100)
    with serve_bindings(loopback_settings(), _bindings(servicer)) as (port, _):
        with Client(f"127.0.0.1:{port}", retry=RetryPolicy(initial_backoff_seconds=0.01, max_attempts=3)) as client:
            with pytest.raises(UnavailableError) as caught:
                client.generate("a dog", base_model="tiny-sd")
    assert len(servicer.calls) == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.retry_delay_seconds is not None


def test_invalid_argument_is_never_retried_and_names_the_field() -> None:
    servicer = FlakyInference(failures=0)
    with serve_bindings(loopback_settings(), _bindings(servicer)) as (port, _):
        with Client(f"127.0.0.1:{port}", retry=FAST) as client:
            with pytest.raises(InvalidArgumentError) as caught:
                client.generate("", base_model="tiny-sd")
    assert len(servicer.calls) == 1
    assert caught.value.field == "spec.prompt"
    assert caught.value.field_violations[0].description == "must not be empty"


def test_async_client_retries_too() -> None:
    servicer = FlakyInference(failures=2)
    with serve_bindings(loopback_settings(), _bindings(servicer)) as (port, _):
        async def run() -> inference_pb2.GenerateResponse:
            async with AsyncClient(f"127.0.0.1:{port}", retry=FAST) as client:
                return (await client.generate("a dog", base_model="tiny-sd")).raw
        assert asyncio.run(run()).batch_size == 1
    assert len(servicer.calls) == 3
