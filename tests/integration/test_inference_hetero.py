"""Heterogeneous LoRA batching through gRPC: requests with different LoRA sets share one UNet
forward; a moved alias is prefetched by a replica that held its old version.

Real gRPC on loopback, registry on moto S3, tiny random base at 32 px, 3 steps. The hetero path
(services/inference/hetero.py) adds per-sample low-rank deltas to unmerged base weights, so a
batched image equals its solo (merged) image within the documented tolerance: CPU fp32, max
pixel difference <= 2 of 255 (docs/architecture.md, Inference, "Heterogeneous LoRA batching").
"""

from __future__ import annotations

import concurrent.futures
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory, write_textual_inversion
from tests.integration.test_inference_support import (
    InferenceEnv,
    engine_settings,
    pixels,
    ref,
    rpc_error,
    spec,
    start_env,
)

TOKEN = "<concept>"
TOLERANCE = 2  # max |batched - solo| per pixel channel, CPU fp32 (documented)
LORAS = ("lora-a", "lora-b", "lora-c", "lora-d", "lora-e")
MAX_ADAPTERS = 3


def _broken_lora(good: Path, out_dir: Path) -> Path:
    """A LoRA whose first A matrix has the wrong input width: attaching it fails on the device."""
    tensors = load_file(str(good))
    key = next(k for k in sorted(tensors) if "lora_A" in k or "lora.down" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / LORA_WEIGHTS_FILE))
    return out_dir / LORA_WEIGHTS_FILE


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-hetero")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
                               batch_wait_ms=400.0, max_batch_size=8, device_cache_max_adapters=MAX_ADAPTERS)
    env = start_env(settings, tiny_random_pipeline_dir)
    factory = LoraFactory(tiny_random_pipeline_dir, text_encoder=True)
    for seed, name in enumerate(LORAS):
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / name, seed=seed)})
    env.publish("broken", "LORA", {LORA_WEIGHTS_FILE: _broken_lora(env.files["lora-a"][LORA_WEIGHTS_FILE],
                                                                 tmp / "broken")})
    path = write_textual_inversion(tmp / "ti-a", TOKEN, dim=64, seed=10, num_vectors=2)
    env.publish("ti-a", "TEXTUAL_INVERSION", {TI_EMBEDS_FILE: path}, trigger_tokens=[TOKEN])
    yield env
    env.close()


def together(env: InferenceEnv, jobs: list[dict[str, Any]]) -> list[Any]:
    """Send `jobs` at once; each entry is the response or the grpc.RpcError it raised."""
    def one(kw: dict[str, Any]) -> Any:
        try:
            return env.generate(**kw)
        except grpc.RpcError as err:
            return err

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def hetero_forwards(env: InferenceEnv) -> int:
    """UNet forwards with per-row deltas: pipeline-call batches plus continuous steps."""
    return env.engine.runner.paths["hetero"] + env.engine.stepper.paths["hetero"]


def max_diff(a: inference_pb2.GenerateResponse, b: inference_pb2.GenerateResponse) -> int:
    return max(int(np.abs(pixels(x.png) - pixels(y.png)).max()) for x, y in zip(a.images, b.images, strict=True))


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_mixed_adapters_and_weights_share_one_forward_within_tolerance_of_solo(env: InferenceEnv,
                                                                               guidance: float) -> None:
    jobs: list[dict[str, Any]] = [
        dict(adapters=[("lora-a", 1.0)], seed=5, prompt="a red box", num_images=2),
        dict(adapters=[("lora-b", 0.5)], seed=6, prompt="a blue cat"),
        dict(adapters=[("lora-a", -0.7), ("lora-b", 0.3)], seed=7, prompt="a green toy"),
        dict(adapters=[("ti-a", 1.0)], seed=8, prompt=f"a photo of {TOKEN}"),
        dict(adapters=[], seed=9, prompt="a photo"),
    ]
    for job in jobs:
        job["guidance_scale"] = guidance
    hetero_before = hetero_forwards(env)
    batched = together(env, jobs)
    assert hetero_forwards(env) > hetero_before
    assert max(r.batch_size for r in batched) >= 3
    base_alone = env.generate(seed=5, prompt="a red box", num_images=2, guidance_scale=guidance)
    diffs = []
    for job, response in zip(jobs, batched, strict=True):
        alone = env.generate(**job)
        assert alone.batch_size == 1
        diffs.append(max_diff(response, alone))
        assert [i.seed for i in response.images] == [i.seed for i in alone.images]
    print("batched vs solo max pixel diffs:", diffs)
    assert max(diffs) <= TOLERANCE, diffs
    assert max_diff(batched[0], base_alone) > 4 * TOLERANCE  # the adapter really took effect in the shared forward


def test_a_failing_adapter_attach_fails_only_its_own_request(env: InferenceEnv) -> None:
    jobs: list[dict[str, Any]] = [dict(adapters=[("lora-a", 1.0)], seed=3), dict(adapters=[("broken", 1.0)], seed=3),
                                  dict(adapters=[("lora-b", 1.0)], seed=4)]
    results = together(env, jobs)
    assert isinstance(results[1], grpc.RpcError)
    assert results[1].code() == grpc.StatusCode.FAILED_PRECONDITION
    for job, response in ((jobs[0], results[0]), (jobs[2], results[2])):
        assert isinstance(response, inference_pb2.GenerateResponse), response
        assert max_diff(response, env.generate(**job)) <= TOLERANCE
    err = rpc_error(lambda: env.generate(**jobs[1]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


def _histogram(env: InferenceEnv, bound: float) -> tuple[float, float]:
    """(observations <= bound, all observations) of adapters_per_batch."""
    at_most = total = 0.0
    for sample in next(iter(env.engine.metrics.adapters_per_batch.collect())).samples:
        if sample.name.endswith("_bucket") and sample.labels["le"] == str(float(bound)):
            at_most = sample.value
        if sample.name.endswith("_count"):
            total = sample.value
    return at_most, total


def test_32_concurrent_mixed_requests_never_exceed_the_device_tier_bound(env: InferenceEnv) -> None:
    rng = random.Random(13)
    jobs = []
    for i in range(32):
        names = rng.sample(LORAS, rng.choice([1, 1, 2]))
        jobs.append(dict(adapters=[(n, rng.choice([1.0, 0.5, -0.4])) for n in names], seed=i, steps=2))
    at_most_before, total_before = _histogram(env, MAX_ADAPTERS)
    results = together(env, jobs)
    assert all(isinstance(r, inference_pb2.GenerateResponse) for r in results), results
    at_most, total = _histogram(env, MAX_ADAPTERS)
    assert total - total_before >= 4  # several batches...
    assert at_most - at_most_before == total - total_before  # ...each within the device tier's entry bound
    assert max(r.batch_size for r in results) > 1
    assert len(env.engine.device_state.adapters.keys()) <= MAX_ADAPTERS


def test_a_moved_alias_is_prefetched_by_a_replica_holding_the_old_version(
        moto_server: MotoServer, tiny_random_pipeline_dir: Path, tmp_path: Path) -> None:
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp_path, tiny_random_pipeline_dir,
                               adapter_ref_ttl_seconds=0.3)
    env = start_env(settings, tiny_random_pipeline_dir)
    try:
        factory = LoraFactory(tiny_random_pipeline_dir)
        env.publish("moving", "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp_path / "v1", seed=21)})
        env.registry.adapters.set_alias("default", "moving", "prod", 1)

        def by_alias() -> inference_pb2.GenerateResponse:
            request = spec(steps=2)
            request.adapters.append(inference_pb2.AdapterWeight(ref=ref("moving", alias="prod"), weight=1.0))
            return env.stub.Generate(inference_pb2.GenerateRequest(spec=request), timeout=60)

        assert by_alias().adapters[0].version == 1
        env.publish("moving", "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp_path / "v2", seed=22)})
        before = sum(env.store.blob_reads().values())
        env.registry.adapters.set_alias("default", "moving", "prod", 2)
        deadline = time.monotonic() + 15
        while sum(env.store.blob_reads().values()) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        fetched = sum(env.store.blob_reads().values())
        assert fetched == before + 1  # the new version's blob came in without any request for it
        assert by_alias().adapters[0].version == 2
        assert sum(env.store.blob_reads().values()) == fetched  # ...so the first request found it warm
    finally:
        env.close()
