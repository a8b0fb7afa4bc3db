"""Step-level continuous batching through gRPC (services/inference/continuous.py, step_loop.py).

Requests join a running batch between denoising steps and leave it when their last step is done
or their caller is gone. Real gRPC on loopback, registry on moto S3, tiny random base at 32 px.
A request batched with others equals its solo image within the documented tolerance (CPU fp32,
max 2 levels of 255: other batch sizes and per-row LoRA deltas reassociate float sums).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_hetero import LORAS as HETERO_LORAS
from tests.integration.test_inference_hetero import TOLERANCE, _broken_lora, max_diff, together
from tests.integration.test_inference_hetero import (
    test_32_concurrent_mixed_requests_never_exceed_the_device_tier_bound as test_32_concurrent_rows_within_bound,
)
from tests.integration.test_inference_hetero import (
    test_a_failing_adapter_attach_fails_only_its_own_request as test_a_failing_attach_fails_only_its_own_row,
)
from tests.integration.test_inference_support import InferenceEnv, engine_settings, spec, start_env

LORAS = HETERO_LORAS  # the hetero module's tests below run here too, on the step loop
__all__ = ["test_32_concurrent_rows_within_bound", "test_a_failing_attach_fails_only_its_own_row"]


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-continuous")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
                               batch_wait_ms=5.0, max_batch_size=8, device_cache_max_adapters=3,
                               continuous_batching=True)
    env = start_env(settings, tiny_random_pipeline_dir)
    factory = LoraFactory(tiny_random_pipeline_dir, text_encoder=True)
    for seed, name in enumerate(LORAS):
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / name, seed=seed)})
    env.publish("broken", "LORA", {LORA_WEIGHTS_FILE: _broken_lora(env.files["lora-a"][LORA_WEIGHTS_FILE],
                                                                 tmp / "broken")})
    unet_only = LoraFactory(tiny_random_pipeline_dir)
    for seed, name in enumerate(("cold-1", "cold-2"), start=30):
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: unet_only.write(tmp / name, seed=seed)})
    yield env
    env.close()


def _after_steps(env: InferenceEnv, job: dict[str, Any], steps: int) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `job` as a stream in a thread; return once it reported `steps` denoising steps."""
    out: dict[str, Any] = {}
    reached = threading.Event()

    def run() -> None:
        try:
            for event in env.stub.GenerateStream(inference_pb2.GenerateStreamRequest(spec=spec(**job)), timeout=120):
                if event.HasField("progress") and event.progress.stage == "denoising" and event.progress.step >= steps:
                    reached.set()
                if event.HasField("result"):
                    out["result"] = event.result
        except grpc.RpcError as err:
            out["error"] = err
        reached.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert reached.wait(60)
    return thread, out


def test_a_request_joins_a_running_batch_between_steps_and_equals_its_solo_image(env: InferenceEnv) -> None:
    long_job: dict[str, Any] = dict(adapters=[("lora-a", 1.0)], seed=3, steps=40, prompt="a long one")
    short_job: dict[str, Any] = dict(adapters=[("lora-b", 0.6)], seed=4, steps=3, prompt="a short one")
    sizes = env.engine.stepper.step_sizes
    mark = len(sizes)
    thread, long_out = _after_steps(env, long_job, 5)  # the long request is 5 steps in
    short = env.generate(**short_job)
    assert "result" not in long_out  # the short request finished first: it did not wait for the batch
    thread.join(120)
    run = sizes[mark:]
    assert run[0] == 1 and 2 in run and run[-1] == 1  # 1 row, then 2 (admitted mid-run), then 1 again
    assert short.batch_size == 2 and long_out["result"].batch_size == 2
    assert max_diff(short, env.generate(**short_job)) <= TOLERANCE
    assert max_diff(long_out["result"], env.generate(**long_job)) <= TOLERANCE


def test_different_steps_schedulers_and_guidance_share_forwards_within_tolerance(env: InferenceEnv) -> None:
    jobs: list[dict[str, Any]] = [
        dict(adapters=[("lora-a", 1.0)], seed=5, steps=3, scheduler="SCHEDULER_KIND_DDIM", num_images=2),
        dict(adapters=[("lora-b", 0.5)], seed=6, steps=5, scheduler="SCHEDULER_KIND_EULER", guidance_scale=1.0),
        dict(adapters=[("lora-a", -0.5), ("lora-c", 0.8)], seed=7, steps=4, scheduler="SCHEDULER_KIND_EULER_ANCESTRAL"),
        dict(adapters=[], seed=8, steps=3, guidance_scale=3.0),
    ]
    mark = len(env.engine.stepper.step_sizes)
    batched = together(env, jobs)
    assert max(env.engine.stepper.step_sizes[mark:]) >= 3
    diffs = [max_diff(response, env.generate(**job)) for job, response in zip(jobs, batched, strict=True)]
    print("continuous batched vs solo max pixel diffs:", diffs)
    assert max(diffs) <= TOLERANCE, diffs


def test_deadline_and_cancellation_mid_batch_free_their_rows(env: InferenceEnv) -> None:
    survivor: dict[str, Any] = dict(adapters=[("lora-c", 1.0)], seed=9, steps=30, prompt="survivor")
    thread, survivor_out = _after_steps(env, survivor, 2)
    stream = env.stub.GenerateStream(inference_pb2.GenerateStreamRequest(
        spec=spec(adapters=[("lora-a", 1.0)], seed=10, steps=150)), timeout=120)
    for event in stream:
        if event.HasField("progress") and event.progress.stage == "denoising":
            break
    stream.cancel()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        env.generate(adapters=[("lora-b", 1.0)], seed=11, steps=150, timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    thread.join(120)
    assert "result" in survivor_out, survivor_out
    deadline = time.monotonic() + 10
    while env.engine.batcher.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not env.engine.batcher.running  # both dead rows left the batch long before 150 steps
    assert time.monotonic() - started < 30
    assert max_diff(survivor_out["result"], env.generate(**survivor)) <= TOLERANCE


def test_a_cold_unet_only_lora_has_its_prompt_encoded_during_the_fetch(env: InferenceEnv) -> None:
    stepper = env.engine.stepper
    before = stepper.base_encodes
    cold = env.generate(adapters=[("cold-1", 1.0)], seed=12)
    assert stepper.base_encodes == before + 1  # encoded while the adapter downloaded
    warm = env.generate(adapters=[("cold-1", 1.0)], seed=12)
    assert stepper.base_encodes == before + 1  # warm: no early encoding
    assert [i.png for i in cold.images] == [i.png for i in warm.images]  # same embeddings, same bytes
    # With a text-encoder LoRA in the mix the early embeddings are dropped: encoded after the fetch.
    job: dict[str, Any] = dict(adapters=[("lora-a", 1.0), ("cold-2", 1.0)], seed=12)
    first = env.generate(**job)
    assert stepper.base_encodes == before + 2
    assert [i.png for i in first.images] == [i.png for i in env.generate(**job).images]
