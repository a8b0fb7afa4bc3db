"""The adapter cache under concurrency: single flight, bounds, eviction that frees memory, ops RPCs.

Real gRPC on loopback with auth on (two tenants), registry on moto S3 behind a counting store,
tiny random base model. Device tier: 3 adapters; host tier: room for about 4 LoRAs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.fixtures.grpc_servers import bearer
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import BASE, InferenceEnv, engine_settings, pixels, ref, start_env

ADAPTERS = [f"style-{i}" for i in range(8)]
DEVICE_MAX = 3


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-cache")
    factory = LoraFactory(tiny_random_pipeline_dir)
    files = {name: factory.write(tmp / name, seed=100 + i) for i, name in enumerate(ADAPTERS)}
    lora_bytes = files[ADAPTERS[0]].stat().st_size
    settings = engine_settings(
        moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
        device_cache_max_adapters=DEVICE_MAX, host_cache_bytes=int(lora_bytes * 4.5),
        auth_enabled=True, api_keys="key-a=default,key-b=other", batch_wait_ms=20.0,
    )
    env = start_env(settings, tiny_random_pipeline_dir, metadata=bearer("key-a"))
    for name, path in files.items():
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: path})
    env.publish("theirs", "LORA", {LORA_WEIGHTS_FILE: files[ADAPTERS[0]]}, tenant="other")
    yield env
    env.close()


def status(env: InferenceEnv, key: str = "key-a") -> inference_pb2.GetCacheStatusResponse:
    return env.stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=bearer(key), timeout=10)


def unet_footprint(env: InferenceEnv) -> tuple[int, int, int, int]:
    """(parameters, parameter bytes, modules, saved-original bytes) of the base UNet, with the
    peft wrappers (taken out of the forward path between pipeline calls) put back in the tree."""
    engine = env.engine

    def measure() -> tuple[int, int, int, int]:
        engine.device_state.mergers.unstrip_all()
        unet: torch.nn.Module = engine.pipelines.get(BASE).pipe.unet
        params = list(unet.parameters())
        return (sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params),
                len(list(unet.modules())), engine.device_state.mergers.saved_bytes())

    return env.on_device(measure)  # type: ignore[no-any-return]


def test_32_concurrent_requests_over_8_adapters(env: InferenceEnv) -> None:
    env.generate(steps=2)  # load the base model first: the burst is about adapters
    jobs = [ADAPTERS[k % 8] for k in range(32)]
    samples: list[inference_pb2.GetCacheStatusResponse] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            samples.append(status(env))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda name: env.generate(adapters=[(name, 1.0)], seed=3, steps=2), jobs))
    finally:
        done.set()
        watcher.join()
    samples.append(status(env))

    # One registry download per adapter version, however many requests wanted it at once.
    reads = env.store.blob_reads()
    assert sorted(reads.values()) == [1] * 8, reads
    # Never above the bounds, in any sample.
    for sample in samples:
        for tier in sample.tiers:
            assert tier.used_bytes <= tier.capacity_bytes, tier
            assert tier.max_entries == 0 or len(tier.entries) <= tier.max_entries, tier
    device = next(t for t in samples[-1].tiers if t.tier == inference_pb2.CACHE_TIER_KIND_DEVICE)
    host = next(t for t in samples[-1].tiers if t.tier == inference_pb2.CACHE_TIER_KIND_HOST)
    assert len(device.entries) == DEVICE_MAX and device.evictions > 0 and host.evictions > 0
    # Correct: every image equals the same request run alone afterwards (adapters re-attached),
    # within the hetero-batching tolerance (different LoRAs share one UNet forward: max 2 levels).
    pngs: dict[str, set[bytes]] = {}
    for name, result in zip(jobs, results, strict=True):
        assert [a.name for a in result.adapters] == [name]
        pngs.setdefault(name, set()).add(result.images[0].png)
    solo = {name: pixels(env.generate(adapters=[(name, 1.0)], seed=3, steps=2).images[0].png) for name in pngs}
    for name, images in pngs.items():
        assert max(int(np.abs(pixels(png) - solo[name]).max()) for png in images) <= 2, name
    assert len({s.tobytes() for s in solo.values()}) == 8


def test_evicting_every_adapter_restores_the_unet_exactly(env: InferenceEnv) -> None:
    env.on_device(env.engine.device_state.clear)
    baseline = unet_footprint(env)
    assert baseline[3] == 0
    base_png = env.generate(seed=7).images[0].png
    env.generate(adapters=[(ADAPTERS[0], 1.0)], seed=7)
    env.generate(adapters=[(ADAPTERS[1], -1.0)], seed=7)
    loaded = unet_footprint(env)
    assert loaded[0] > baseline[0] and loaded[2] > baseline[2] and loaded[3] > 0
    env.on_device(env.engine.device_state.clear)
    assert unet_footprint(env) == baseline  # parameters, bytes, modules (no empty wrappers), no copies
    assert env.generate(seed=7).images[0].png == base_png


def test_preload_tiers_and_cache_status(env: InferenceEnv) -> None:
    env.on_device(env.engine.device_state.clear)
    response = env.stub.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(
        base_model=BASE, adapters=[ref(ADAPTERS[5])], tier=inference_pb2.CACHE_TIER_KIND_HOST),
        metadata=env.metadata, timeout=30)
    assert [(a.name, a.version) for a in response.adapters] == [(ADAPTERS[5], 1)]
    by_tier = {t.tier: [e.key for e in t.entries] for t in status(env).tiers}
    assert any(ADAPTERS[5] in key for key in by_tier[inference_pb2.CACHE_TIER_KIND_HOST])
    assert not by_tier[inference_pb2.CACHE_TIER_KIND_DEVICE]
    env.stub.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(base_model=BASE, adapters=[ref(ADAPTERS[5])]),
                             metadata=env.metadata, timeout=30)
    current = status(env)
    device = next(t for t in current.tiers if t.tier == inference_pb2.CACHE_TIER_KIND_DEVICE)
    assert [e.key.split(" on ")[0] for e in device.entries] == [f"default/{ADAPTERS[5]}@1"]
    assert list(current.loaded_base_models) == [BASE]
    assert current.queue_capacity == env.settings.queue_size and current.queue_depth == 0
    # The other tenant sees the totals but not our adapters' names, and we never see theirs.
    env.stub.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(base_model=BASE, adapters=[ref("theirs")]),
                             metadata=bearer("key-b"), timeout=30)
    theirs = {t.tier: [e.key for e in t.entries] for t in status(env, "key-b").tiers}
    ours = {t.tier: [e.key for e in t.entries] for t in status(env).tiers}
    device_kind = inference_pb2.CACHE_TIER_KIND_DEVICE
    assert all("default/" not in k for k in theirs[device_kind]) and any("other/" in k for k in theirs[device_kind])
    assert all("other/" not in k for k in ours[device_kind])
