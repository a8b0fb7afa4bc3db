"""Warm start and pinning through a real inference server.

Health stays NOT_SERVING until the configured pins and preloads are attached (observed over
gRPC by warm-up probes registered before and after the service); a pinned
adapter survives many other adapters cycling through a 2-adapter device tier (GetCacheStatus
shows it, flagged pinned); pins that cannot fit (`start_runtime(role="inference")`), or
malformed references, fail start-up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier_api.v1 import inference_pb2, inference_pb2_grpc
from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.server import RunningServer, ServiceBinding, start_server
from services.inference.engine import InferenceEngine
from services.inference.pipelines import folder_digest
from services.inference.servicer import inference_bindings
from services.inference.warm import parse_refs
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.runtime import start_runtime
from tests.fixtures.s3 import MotoServer, free_port
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import BASE, SIZE, engine_settings

OTHERS = [f"other-{i}" for i in range(5)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Loop:
    """An event loop in a thread, to start a runtime while the test thread probes it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def published(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, int]:
    """Settings for a fresh registry holding pin-me, pre (alias prod) and 5 others; LoRA file bytes."""
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-warm")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
                               device_cache_max_adapters=2, metrics_port=0)
    registry = Registry.from_settings(settings)
    factory = LoraFactory(tiny_random_pipeline_dir)
    digest = folder_digest(tiny_random_pipeline_dir)
    size = 0
    for i, name in enumerate(["pin-me", "pre", *OTHERS]):
        path = factory.write(tmp / name, seed=40 + i)
        size = path.stat().st_size
        registry.adapters.publish("default", name, kind="LORA", base_model=BASE, base_model_digest=digest,
                                 files={LORA_WEIGHTS_FILE: path})
    registry.adapters.set_alias("default", "pre", "prod", 1)
    return settings, size


def _device(stub: inference_pb2_grpc.InferenceServiceStub) -> inference_pb2.CacheTierStatus:
    tiers = stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), timeout=10).tiers
    return next(t for t in tiers if t.tier == inference_pb2.CACHE_TIER_KIND_DEVICE)


Probe = list[tuple[int, dict[str, bool]]]


def _probe(port: int, seen: Probe) -> ServiceBinding:
    """A warm-up step recording what a client sees at that point of start-up: health and the
    device tier's entries (key -> pinned), both over gRPC on the server being started."""
    async def probe() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            status = await inference_pb2_grpc.InferenceServiceStub(channel).GetCacheStatus(
                inference_pb2.GetCacheStatusRequest())
        device = next(t for t in status.tiers if t.tier == inference_pb2.CACHE_TIER_KIND_DEVICE)
        seen.append((health.status, {e.key.split(" on ")[0]: e.pinned for e in device.entries}))

    return ServiceBinding("atelier.test.Probe", lambda _server: None, warmup=probe)


@pytest.fixture(scope="module")
def warm(published: tuple[Settings, int]) -> Iterator[tuple[int, Probe]]:
    """The inference service between two probes: [probe, InferenceService (warm start), probe]."""
    settings, _size = published
    port = free_port()
    settings = settings.model_copy(update={"pinned_adapters": f"{BASE}/default/pin-me@1",
                                           "preload_adapters": f"{BASE}/default/pre:prod"})
    seen: Probe = []

    async def start() -> tuple[InferenceEngine, RunningServer]:
        engine = InferenceEngine(settings, Registry.from_settings(settings))
        bindings = [_probe(port, seen), *inference_bindings(engine), _probe(port, seen)]
        return engine, await start_server(settings, bindings, port)

    loop = Loop()
    engine, running = loop.submit(start()).result(120)
    try:
        yield port, seen
    finally:
        loop.submit(running.stop(0)).result(30)
        loop.submit(engine.close()).result(30)
        loop.close()


def test_serving_only_after_pins_and_preloads_are_attached(warm: tuple[int, Probe]) -> None:
    port, seen = warm
    before, after = seen
    assert before == (NOT_SERVING, {})  # bound and answering, nothing attached yet, not serving
    assert after == (NOT_SERVING, {"default/pin-me@1": True, "default/pre@1": False})
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == SERVING


def test_pinned_adapter_survives_others_cycling_through(warm: tuple[int, Probe]) -> None:
    port, _seen = warm
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for name in OTHERS * 2:
            spec = inference_pb2.GenerationSpec(base_model=BASE, prompt="a red box", steps=1, width=SIZE, height=SIZE,
                                                seed=1, adapters=[inference_pb2.AdapterWeight(ref={"name": name},
                                                                                              weight=1.0)])
            stub.Generate(inference_pb2.GenerateRequest(spec=spec), timeout=120)
            device = _device(stub)
            keys = [e.key.split(" on ")[0] for e in device.entries]
            assert "default/pin-me@1" in keys and f"default/{name}@1" in keys and len(keys) == 2, keys
            assert device.used_bytes <= device.capacity_bytes
        assert device.evictions >= len(OTHERS) * 2 - 1
        # Requests with the pinned adapter still work, and a pinned one plus one other fit together.
        spec.adapters.append(inference_pb2.AdapterWeight(ref={"name": "pin-me"}, weight=0.5))
        assert stub.Generate(inference_pb2.GenerateRequest(spec=spec), timeout=120).images


def test_pins_that_do_not_fit_fail_start_up(published: tuple[Settings, int]) -> None:
    settings, size = published
    port = free_port()
    settings = settings.model_copy(update={
        "inference_port": port, "device_cache_bytes": int(size * 1.5),
        "pinned_adapters": f"{BASE}/default/pin-me, {BASE}/default/{OTHERS[0]}@1"})
    loop = Loop()
    try:
        with pytest.raises(FailedPrecondition, match=f"pinned_adapters: cannot pin {BASE}/default/{OTHERS[0]}@1"):
            loop.submit(start_runtime(settings, "inference")).result(120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    finally:
        loop.close()


def test_reference_format() -> None:
    refs = parse_refs(" tiny/acme/style-1@3, tiny@2/acme/style-2:prod ,tiny/acme/latest-one", "preload_adapters")
    assert [(r.base_model, r.spec.ref) for r in refs] == [
        ("tiny", AdapterRef("acme", "style-1", version=3)), ("tiny@2", AdapterRef("acme", "style-2", alias="prod")),
        ("tiny", AdapterRef("acme", "latest-one"))]
    for bad in ("tiny/acme", "tiny/acme/x@0", "tiny/acme/x@1:prod", "Tiny/acme/x", "tiny//x"):
        with pytest.raises(InvalidInput) as info:
            parse_refs(bad, "pinned_adapters")
        assert info.value.violations[0].field == "pinned_adapters"
