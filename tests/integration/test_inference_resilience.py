"""Overload, registry outage, deadlines and cancellation: the service degrades the documented way.

Real gRPC on loopback, registry on moto S3 (stopped and restarted by one test), tiny base model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import InferenceEnv, details, engine_settings, rpc_error, spec, start_env

QUEUE = 4


@pytest.fixture
def make_env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
             tmp_path: Path) -> Iterator[tuple[MotoServer, callable]]:  # type: ignore[valid-type]
    envs: list[InferenceEnv] = []

    def make(**overrides: object) -> InferenceEnv:
        moto_server.ensure_running()
        ttl = overrides.pop("ref_ttl_seconds", 10.0)
        settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp_path,
                                   tiny_random_pipeline_dir, **overrides)
        env = start_env(settings, tiny_random_pipeline_dir, ref_ttl_seconds=ttl)
        envs.append(env)
        return env

    yield moto_server, make
    for env in envs:
        env.close()
    moto_server.ensure_running()


def steps_run(env: InferenceEnv) -> float:
    """Denoising steps executed so far (the engine's step-time histogram count)."""
    for metric in env.engine.metrics.step_seconds.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count"):
                return sample.value
    return 0.0


def test_overload_rejects_the_excess_at_once_and_recovers(make_env: tuple[MotoServer, callable]) -> None:
    _, make = make_env
    env = make(queue_size=QUEUE, max_batch_size=1, batch_wait_ms=0.0)
    env.generate(steps=2)  # base model loaded
    barrier = threading.Barrier(4 * QUEUE)

    def one(i: int) -> tuple[str, float, float | None]:
        barrier.wait()
        started = time.monotonic()
        try:
            env.generate(steps=12, seed=i)
            return "ok", time.monotonic() - started, None
        except grpc.RpcError as err:
            return err.code().name, time.monotonic() - started, details(err)["retry_after"]

    with ThreadPoolExecutor(4 * QUEUE) as pool:
        outcomes = list(pool.map(one, range(4 * QUEUE)))
    ok = [o for o in outcomes if o[0] == "ok"]
    rejected = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    assert len(ok) + len(rejected) == 4 * QUEUE, outcomes
    assert len(ok) >= QUEUE and len(rejected) >= QUEUE, outcomes
    assert max(o[1] for o in rejected) < min(max(o[1] for o in ok), 2.0)  # promptly, not after queueing
    assert all(o[2] and o[2] > 0 for o in rejected)  # RetryInfo
    health = health_pb2_grpc.HealthStub(env.server.channel())
    assert health.Check(health_pb2.HealthCheckRequest(service="atelier.v1.InferenceService"),
                        timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert len(env.generate(steps=2).images) == 1
    assert env.stub.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), timeout=5).queue_depth == 0


def test_registry_outage_cached_adapters_keep_working(make_env: tuple[MotoServer, callable],
                                                      tiny_random_pipeline_dir: Path, tmp_path: Path) -> None:
    moto, make = make_env
    env = make(ref_ttl_seconds=0.0)  # every request re-resolves: the outage path is exercised
    factory = LoraFactory(tiny_random_pipeline_dir)
    files = {name: {LORA_WEIGHTS_FILE: factory.write(tmp_path / name, seed=i)}
             for i, name in enumerate(("cached", "uncached"))}
    for name, f in files.items():
        env.publish(name, "LORA", f)
    before = env.generate(adapters=[("cached", 1.0)], steps=2).images[0].png
    bucket = env.settings.registry_url[len("s3://"):].split("/", 1)[0]
    moto.stop()
    try:
        assert env.generate(adapters=[("cached", 1.0)], steps=2).images[0].png == before
        err = rpc_error(lambda: env.generate(adapters=[("uncached", 1.0)], steps=2))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        assert details(err)["retry_after"] is not None
    finally:
        moto.start()
    moto.create_bucket(bucket)  # moto keeps nothing across a restart: publish again
    for name, f in files.items():
        env.publish(name, "LORA", f)
    assert len(env.generate(adapters=[("uncached", 1.0)], steps=2).images) == 1
    assert env.generate(adapters=[("cached", 1.0)], steps=2).images[0].png == before


def test_deadline_stops_the_work_between_steps(make_env: tuple[MotoServer, callable]) -> None:
    _, make = make_env
    env = make(max_inference_steps=400)
    env.generate(steps=2)
    before = steps_run(env)
    err = rpc_error(lambda: env.generate(steps=400, timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    started = time.monotonic()
    assert len(env.generate(steps=2).images) == 1
    assert time.monotonic() - started < 5.0
    assert steps_run(env) - before < 300  # the 400-step call stopped early


def test_cancelled_stream_frees_the_device(make_env: tuple[MotoServer, callable]) -> None:
    _, make = make_env
    env = make(max_inference_steps=400)
    env.generate(steps=2)
    before = steps_run(env)
    call = env.stub.GenerateStream(inference_pb2.GenerateStreamRequest(spec=spec(steps=400)), timeout=120)
    seen = 0
    for event in call:
        if event.HasField("progress") and event.progress.stage == "denoising":
            seen += 1
            if seen == 2:
                call.cancel()
                break
    time.sleep(0.5)
    started = time.monotonic()
    assert len(env.generate(steps=2).images) == 1
    assert time.monotonic() - started < 5.0
    assert steps_run(env) - before < 300
