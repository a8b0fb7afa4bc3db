"""TIES / DARE through InferenceService: the weights our merger builds and the images they give
equal an independent reference (peft's merge_utils on the adapters' own files, in a plain
diffusers pipeline). Real gRPC on loopback, registry on moto S3, tiny random base model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils import merge_utils
from safetensors.torch import load_file

from atelier_api.v1 import inference_pb2
from services.inference.merge_methods import layer_seed
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import (
    BASE,
    SIZE,
    STEPS,
    InferenceEnv,
    details,
    engine_settings,
    pixels,
    rpc_error,
    start_env,
)

WEIGHTS = (0.9, -0.6)
SCALE = 2.0  # LoraFactory writes alpha = 2 * rank


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-merge")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir)
    env = start_env(settings, tiny_random_pipeline_dir)
    factory = LoraFactory(tiny_random_pipeline_dir)
    for seed, name in enumerate(("m-a", "m-b")):
        env.publish(name, "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / name, seed=20 + seed, scale=0.3)})
    yield env
    env.close()


def _generate(env: InferenceEnv, method: int, density: float | None = None,
              seed: int | None = None) -> inference_pb2.GenerateResponse:
    spec = inference_pb2.GenerationSpec(
        base_model=BASE, prompt="a red box", steps=STEPS, width=SIZE, height=SIZE, seed=1, merge_method=method,
        adapters=[inference_pb2.AdapterWeight(ref={"name": n}, weight=w)
                  for n, w in zip(("m-a", "m-b"), WEIGHTS, strict=True)])
    if density is not None:
        spec.merge_density = density
    if seed is not None:
        spec.merge_seed = seed
    return env.stub.Generate(inference_pb2.GenerateRequest(spec=spec), timeout=120)


def _reference_deltas(env: InferenceEnv) -> dict[str, list[torch.Tensor]]:
    """UNet module path -> [up @ down * scale per adapter], straight from the published files."""
    out: dict[str, list[torch.Tensor]] = {}
    for name in ("m-a", "m-b"):
        state = load_file(str(env.files[name][LORA_WEIGHTS_FILE]))
        for key, down in state.items():
            if key.endswith(".lora.down.weight"):
                path = key[len("unet."):-len(".lora.down.weight")]
                up = state[key.replace(".lora.down.", ".lora.up.")]
                out.setdefault(path, []).append(up @ down * SCALE)
    return out


Reference = Callable[[str, list[torch.Tensor]], torch.Tensor]


def _reference_image(env: InferenceEnv, merged: Reference) -> np.ndarray:
    pipe = StableDiffusionPipeline.from_pretrained(env.pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for path, deltas in _reference_deltas(env).items():
            pipe.unet.get_submodule(path).weight += merged(path, deltas)
        image = pipe("a red box", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     generator=torch.Generator().manual_seed(1)).images[0]
    return np.asarray(image).astype(np.int16)


def test_ties_equals_a_plain_pipeline_with_the_reference_merge(env: InferenceEnv) -> None:
    linear = pixels(_generate(env, inference_pb2.MERGE_METHOD_LINEAR).images[0].png)
    ties = pixels(_generate(env, inference_pb2.MERGE_METHOD_TIES, density=0.3).images[0].png)
    assert not np.array_equal(linear, ties)

    def reference(_path: str, deltas: list[torch.Tensor]) -> torch.Tensor:
        return merge_utils.ties(deltas, torch.tensor(WEIGHTS), 0.3)

    assert np.array_equal(ties, _reference_image(env, reference))
    # The weights themselves: with the wrappers out of the tree, every adapted layer holds
    # original + reference merge, bit for bit.
    merger = next(m for m in env.engine.device_state.mergers.all() if m.prefix == "unet")
    unet = merger.component
    for path, deltas in _reference_deltas(env).items():
        tracked = next(t for t in merger._tracked.values() if t.path == path)
        assert torch.equal(unet.get_submodule(path).weight, tracked.weight + reference(path, deltas))


def test_dare_is_seeded_per_request_and_equals_the_reference(env: InferenceEnv) -> None:
    first = _generate(env, inference_pb2.MERGE_METHOD_DARE_LINEAR, density=0.5, seed=11).images[0].png
    other = _generate(env, inference_pb2.MERGE_METHOD_DARE_LINEAR, density=0.5, seed=12).images[0].png
    again = _generate(env, inference_pb2.MERGE_METHOD_DARE_LINEAR, density=0.5, seed=11).images[0].png
    assert first == again != other

    def reference(path: str, deltas: list[torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(layer_seed(11, f"unet.{path}"))
        return merge_utils.dare_linear(deltas, torch.tensor(WEIGHTS), 0.5)

    assert np.array_equal(pixels(first), _reference_image(env, reference))
    # Back to LINEAR: the originals are restored before the linear merge (nothing leaks).
    linear = _generate(env, inference_pb2.MERGE_METHOD_UNSPECIFIED).images[0].png
    assert linear == _generate(env, inference_pb2.MERGE_METHOD_LINEAR, density=0.2, seed=5).images[0].png


def test_bad_merge_fields_are_invalid_argument(env: InferenceEnv) -> None:
    err = rpc_error(lambda: _generate(env, inference_pb2.MERGE_METHOD_TIES, density=0.0))
    assert details(err)["fields"] == ["spec.merge_density"]
    err = rpc_error(lambda: _generate(env, 42, density=1.5))
    assert details(err)["fields"] == ["spec.merge_method", "spec.merge_density"]
