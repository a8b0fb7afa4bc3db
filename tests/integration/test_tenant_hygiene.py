"""Issue 16 (3, 4e) through the public InferenceService with two tenants (auth on).

* GetCacheStatus shows a tenant only the cache entries it used itself, with its own idle time,
  even when both tenants hold the same bytes (one shared blob on disk).
* A full queue answers RESOURCE_EXHAUSTED + RetryInfo cheaply: before any adapter resolution
  (an unknown adapter still gets RESOURCE_EXHAUSTED) and within milliseconds.
* The SDK never retries RESOURCE_EXHAUSTED faster than its floor or the server's RetryInfo.

Real gRPC on loopback, registry on moto S3, tiny random base model; queue of one request.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from atelier import Client, ResourceExhaustedError, RetryPolicy
from atelier_api.v1 import inference_pb2, inference_pb2_grpc
from services.common.errors import ResourceExhausted
from services.common.server import ServiceBinding
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.fixtures.grpc_servers import bearer, loopback_settings, serve_bindings
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import BASE, InferenceEnv, details, engine_settings, ref, spec, start_env

A, B = bearer("key-a"), bearer("key-b")
DISK, HOST, DEVICE = (inference_pb2.CACHE_TIER_KIND_DISK, inference_pb2.CACHE_TIER_KIND_HOST,
                      inference_pb2.CACHE_TIER_KIND_DEVICE)
FAST = RetryPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.02, max_attempts=1000)


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("tenant-hygiene")
    shared = LoraFactory(tiny_random_pipeline_dir).write(tmp / "shared", seed=11)
    settings = engine_settings(
        moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
        auth_enabled=True, api_keys="key-a=alpha,key-b=beta", queue_size=1, max_batch_size=1,
        max_inference_steps=500,
    )
    env = start_env(settings, tiny_random_pipeline_dir, metadata=A)
    env.publish("mine", "LORA", {LORA_WEIGHTS_FILE: shared}, tenant="alpha")
    env.publish("same-bytes", "LORA", {LORA_WEIGHTS_FILE: shared}, tenant="beta")
    yield env
    env.close()


def tiers(env: InferenceEnv, who: tuple[tuple[str, str]]) -> dict[int, inference_pb2.CacheTierStatus]:
    response = env.stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=who, timeout=10)
    return {t.tier: t for t in response.tiers}


def preload(env: InferenceEnv, who: tuple[tuple[str, str]], name: str, tier: int) -> None:
    env.stub.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(base_model=BASE, adapters=[ref(name)], tier=tier),
                             metadata=who, timeout=60)


def test_cache_status_shows_each_tenant_only_its_own_use(env: InferenceEnv) -> None:
    preload(env, A, "mine", DEVICE)  # disk blob + host payload + device attachment for alpha
    theirs = tiers(env, B)
    assert all(not t.entries for t in theirs.values()), theirs  # beta used nothing: sees nothing
    assert theirs[DISK].used_bytes > 0  # totals stay global aggregates (documented)
    ours = tiers(env, A)
    (blob,) = ours[DISK].entries
    assert [e.key for e in ours[HOST].entries] == ["alpha/mine@1"]
    assert [e.key.split(" on ")[0] for e in ours[DEVICE].entries] == ["alpha/mine@1"]

    time.sleep(0.5)
    preload(env, B, "same-bytes", HOST)  # the same blob, served from alpha's download
    assert list(env.store.blob_reads().values()) == [1]
    theirs, ours = tiers(env, B), tiers(env, A)
    assert [(e.key, e.bytes) for e in theirs[DISK].entries] == [(blob.key, blob.bytes)]
    assert theirs[DISK].entries[0].idle_seconds < 0.4  # beta's own last use
    assert ours[DISK].entries[0].idle_seconds >= 0.5  # beta's use did not refresh alpha's idle time
    assert [e.key for e in theirs[HOST].entries] == ["beta/same-bytes@1"] and not theirs[DEVICE].entries
    assert [e.key for e in ours[HOST].entries] == ["alpha/mine@1"]


def _fill_queue(env: InferenceEnv) -> list[Any]:
    """One long request on the device (seen denoising), one waiting: the queue (capacity 1) is full."""
    running = env.stub.GenerateStream(inference_pb2.GenerateStreamRequest(spec=spec(steps=500)),
                                      metadata=A, timeout=120)
    for event in running:
        if event.HasField("progress") and event.progress.stage == "denoising":
            break
    waiting = env.stub.Generate.future(inference_pb2.GenerateRequest(spec=spec(steps=2)), metadata=A, timeout=120)
    deadline = time.monotonic() + 30
    while env.stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=A, timeout=10).queue_depth < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
    return [running, waiting]


def test_full_queue_is_refused_before_any_work_and_fast(env: InferenceEnv) -> None:
    env.generate(steps=1)  # base model loaded: rejection timing must not include it
    futures = _fill_queue(env)
    try:
        unknown = inference_pb2.GenerateRequest(spec=spec(adapters=[("no-such-adapter", 1.0)]))
        baseline, rejected = [], []
        for _ in range(7):
            t0 = time.perf_counter()
            env.stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=B, timeout=10)
            baseline.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as caught:
                env.stub.Generate(unknown, metadata=B, timeout=10)
            rejected.append(time.perf_counter() - t0)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not NOT_FOUND: nothing resolved
            assert details(caught.value)["retry_after"] == pytest.approx(1.0)
        # < 50 ms, with room for a busy machine: a cheap RPC's latency measured alongside.
        print(f"queue-full rejection median {statistics.median(rejected) * 1000:.1f} ms, "
              f"GetCacheStatus median {statistics.median(baseline) * 1000:.1f} ms")
        assert statistics.median(rejected) < max(0.05, 3 * statistics.median(baseline)), (rejected, baseline)

        # The SDK honours the server's RetryInfo (1 s): few attempts in a 2.5 s window.
        before = env.engine.metrics.rejected._value.get()
        with Client(env.server.target, api_key="key-b", retry=FAST) as client:
            with pytest.raises(ResourceExhaustedError):
                client.generate("a red box", base_model=BASE, steps=2, width=32, height=32, timeout=2.5)
        assert 2 <= env.engine.metrics.rejected._value.get() - before <= 3
    finally:
        for future in futures:
            future.cancel()


class AlwaysFull(inference_pb2_grpc.InferenceServiceServicer):
    """Answers every Generate with RESOURCE_EXHAUSTED and a fixed RetryInfo; counts calls."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = retry_after
        self.calls: list[float] = []
        self.lock = threading.Lock()

    async def Generate(self, request: Any, context: Any) -> inference_pb2.GenerateResponse:
        with self.lock:
            self.calls.append(time.monotonic())
        raise ResourceExhausted("the inference queue is full", retry_after_seconds=self.retry_after)


@pytest.mark.parametrize(("retry_after", "min_gap"), [(0.0, 0.25), (0.6, 0.6)])
def test_sdk_never_retries_resource_exhausted_faster_than_the_floor(retry_after: float, min_gap: float) -> None:
    servicer = AlwaysFull(retry_after)

    def bindings() -> list[ServiceBinding]:
        return [ServiceBinding("atelier.v1.InferenceService",
                               lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s))]

    with serve_bindings(loopback_settings(), bindings) as (port, _):
        with Client(f"127.0.0.1:{port}", retry=FAST) as client:
            with pytest.raises(ResourceExhaustedError):
                client.generate("a dog", base_model="tiny", timeout=1.6)
    gaps = [b - a for a, b in zip(servicer.calls, servicer.calls[1:], strict=False)]
    assert gaps and min(gaps) >= min_gap * 0.98, gaps  # the policy alone would retry every ~10 ms
    assert len(servicer.calls) <= 1 + 1.6 / min_gap
