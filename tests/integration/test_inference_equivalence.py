"""InferenceService images equal plain diffusers', adapters mix without leaking, batching is exact.

Real gRPC on loopback, registry on moto S3, the tiny random base model at 32 px, 3 steps.
LoRA is merged into the weights by the service (see docs/architecture.md, Inference): it is
bit-exact against diffusers' `set_adapters` + `fuse_lora`, and within one 8-bit level of
diffusers' unfused LoRA (fusing only reorders float additions, ~1e-4 levels here).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory, write_dreambooth, write_textual_inversion
from tests.integration.test_inference_support import (
    InferenceEnv,
    diffusers_reference,
    engine_settings,
    pixels,
    spec,
    start_env,
)

TOKEN = "<concept>"


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-eq")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
                               batch_wait_ms=300.0)
    env = start_env(settings, tiny_random_pipeline_dir)
    factory = LoraFactory(tiny_random_pipeline_dir, text_encoder=True)
    for seed, name in enumerate(("lora-a", "lora-b")):
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / name, seed=seed)})
    for seed, name in enumerate(("ti-a", "ti-b")):
        path = write_textual_inversion(tmp / name, TOKEN, dim=64, seed=10 + seed, num_vectors=2)
        env.publish(name, "TEXTUAL_INVERSION", {TI_EMBEDS_FILE: path}, trigger_tokens=[TOKEN])
    env.publish("db", "DREAMBOOTH", write_dreambooth(tiny_random_pipeline_dir, tmp / "db", seed=3, text_encoder=True))
    yield env
    env.close()


def image(response: inference_pb2.GenerateResponse, i: int = 0) -> np.ndarray:
    return pixels(response.images[i].png)


@pytest.mark.parametrize("name", ["lora-a", "lora-b"])  # the second one attaches through the fast path
def test_lora_equals_diffusers(env: InferenceEnv, name: str) -> None:
    lora = env.files[name][LORA_WEIGHTS_FILE]
    for weight in (1.0, -0.7):
        ours = image(env.generate(adapters=[(name, weight)]))
        fused = diffusers_reference(env.pipeline_dir, lora=(lora, weight), fuse=True)
        unfused = diffusers_reference(env.pipeline_dir, lora=(lora, weight), fuse=False)
        assert np.array_equal(ours, fused)
        assert np.abs(ours - unfused).max() <= 1
        assert not np.array_equal(ours, diffusers_reference(env.pipeline_dir))  # the LoRA did something
    if name == "lora-b":
        assert env.engine.device_state.attaches["fast"] >= 1


def test_textual_inversion_equals_diffusers(env: InferenceEnv) -> None:
    prompt = f"a photo of {TOKEN} on a table"
    ours = image(env.generate(prompt=prompt, adapters=[("ti-a", 1.0)]))
    reference = diffusers_reference(env.pipeline_dir, prompt=prompt,
                                    ti=(env.files["ti-a"][TI_EMBEDS_FILE], TOKEN))
    assert np.array_equal(ours, reference)


def test_weight_zero_is_base_and_nothing_leaks_between_requests(env: InferenceEnv) -> None:
    base = env.generate()
    assert env.generate(adapters=[("lora-a", 0.0)]).images[0].png == base.images[0].png
    a1 = env.generate(adapters=[("lora-a", 1.0)])
    b = env.generate(adapters=[("lora-b", 1.0)])
    a2 = env.generate(adapters=[("lora-a", 1.0)])
    assert a1.images[0].png == a2.images[0].png != b.images[0].png
    assert env.generate().images[0].png == base.images[0].png


def test_two_textual_inversions_with_the_same_token_both_take_effect(env: InferenceEnv) -> None:
    prompt = f"a photo of {TOKEN}"
    a = env.generate(prompt=prompt, adapters=[("ti-a", 1.0)]).images[0].png
    b = env.generate(prompt=prompt, adapters=[("ti-b", 1.0)]).images[0].png
    both = env.generate(prompt=prompt, adapters=[("ti-a", 1.0), ("ti-b", 1.0)])
    assert len({a, b, both.images[0].png}) == 3
    # Same as diffusers with the two embeddings under distinct tokens, both in the prompt.
    reference = _two_token_reference(env, "a photo of <ta> <tb>")
    assert np.array_equal(image(both), reference)
    assert [(r.name, r.version) for r in both.adapters] == [("ti-a", 1), ("ti-b", 1)]


def _two_token_reference(env: InferenceEnv, prompt: str) -> np.ndarray:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(env.pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(env.files["ti-a"][TI_EMBEDS_FILE]), token="<ta>")
    pipe.load_textual_inversion(str(env.files["ti-b"][TI_EMBEDS_FILE]), token="<tb>")
    out = pipe(prompt, num_inference_steps=3, height=32, width=32,
               generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(out).astype(np.int16)


def test_dreambooth_lora_and_ti_in_one_request(env: InferenceEnv) -> None:
    base = env.generate(prompt=f"a photo of {TOKEN}").images[0].png
    prompt = f"a photo of {TOKEN}"
    ours = env.generate(prompt=prompt, adapters=[("db", 1.0), ("lora-a", 0.8), ("ti-a", 1.0)])
    db_dir = env.files["db"]["unet/config.json"].parent.parent
    reference = diffusers_reference(env.pipeline_dir, prompt=prompt, dreambooth=db_dir,
                                    lora=(env.files["lora-a"][LORA_WEIGHTS_FILE], 0.8),
                                    ti=(env.files["ti-a"][TI_EMBEDS_FILE], TOKEN))
    assert np.array_equal(image(ours), reference)
    assert [r.kind for r in ours.adapters] == [3, 1, 2]  # DREAMBOOTH, LORA, TEXTUAL_INVERSION
    # The base pipeline is untouched by the swap and the merge.
    assert env.generate(prompt=prompt).images[0].png == base


def test_batched_requests_are_byte_identical_to_solo_runs(env: InferenceEnv) -> None:
    jobs = [dict(prompt="a red box", seed=5), dict(prompt="a blue cat", seed=6),
            dict(prompt="a green toy", seed=7, num_images=2), dict(prompt="a photo", seed=8)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda kw: env.generate(adapters=[("lora-a", 0.5)], **kw), jobs))
    assert max(r.batch_size for r in batched) > 1
    for kw, together in zip(jobs, batched, strict=True):
        alone = env.generate(adapters=[("lora-a", 0.5)], **kw)
        assert alone.batch_size == 1
        assert [i.png for i in together.images] == [i.png for i in alone.images]
        assert [i.seed for i in together.images] == [kw["seed"] + i for i in range(len(together.images))]


def test_generate_stream_reports_every_step_then_the_result(env: InferenceEnv) -> None:
    events = list(env.stub.GenerateStream(inference_pb2.GenerateStreamRequest(spec=spec(steps=4)), timeout=60))
    denoising = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "denoising"]
    total = denoising[0].total_steps  # PNDM evaluates the model steps + 1 times
    assert total in (4, 5) and [p.step for p in denoising] == list(range(1, total + 1))
    assert all(p.total_steps == total for p in denoising)
    stages = [e.progress.stage for e in events if e.HasField("progress")]
    assert stages[0] == "loading_adapters" and "queued" in stages and stages[-1] == "encoding"
    assert events[-1].HasField("result") and len(events[-1].result.images) == 1
    assert events[-1].result.images[0].png == env.generate(steps=4).images[0].png
