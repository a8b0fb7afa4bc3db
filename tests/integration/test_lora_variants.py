"""DoRA and conv ("LoCon") LoRA: trained through the gRPC API, loaded by plain diffusers, served by
our Generate pixel for pixel like diffusers' `load_lora_weights` + `fuse_lora`.

One registry (local directory) shared by a training stack and an inference server on real gRPC,
the tiny random SD 1.x base imported into it; each variant trains a few steps at 32 px.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors import safe_open
from typer.testing import CliRunner

from atelier.cli.main import app
from atelier_api.v1 import common_pb2, inference_pb2, registry_pb2, training_pb2
from services.families import by_name
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from tests.integration.test_inference_support import InferenceEnv, pixels
from tests.integration.test_training_support import LORA, TrainingStack
from tests.integration.train_and_serve_support import train_and_serve, upload_concept

pytestmark = pytest.mark.slow

PROMPT = "a photo of sks toy on a blue floor"
STEPS, SIZE, SEED = 3, 32, 4
BASE = "tiny-sd1"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (family, LoraOptions)
    "dora": ("sd1", {"use_dora": True}),
    "locon": ("sd1", {"conv_rank": 2, "conv_alpha": 1.0}),
    "dora-locon": ("sd1", {"use_dora": True, "conv_rank": 2}),
    "sdxl-dora-locon": ("sdxl", {"use_dora": True, "conv_rank": 2}),
    "flux-dora": ("flux", {"use_dora": True}),
    "dora-text-encoder": ("sd1", {"use_dora": True, "train_text_encoder": True}),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           tiny_family_dirs: dict[str, Path]) -> Iterator[tuple[TrainingStack, InferenceEnv, str]]:
    root = tmp_path_factory.mktemp("lora-variants")
    with train_and_serve(root, tiny_family_dirs, ("sd1", "sdxl", "flux")) as (stack, env):
        yield stack, env, upload_concept(stack, "toys")


def _spec(name: str, dataset: str, family: str = "sd1", **lora: Any) -> training_pb2.TrainingJobSpec:
    hyper = training_pb2.Hyperparameters(max_train_steps=4, resolution=SIZE, checkpointing_steps=1000, seed=5,
                                         learning_rate=1e-2, train_text_encoder=lora.pop("train_text_encoder", False))
    return training_pb2.TrainingJobSpec(method=LORA, base_model=f"tiny-{family}", dataset_id=dataset, output_name=name,
                                        instance_prompt=PROMPT, hyperparameters=hyper,
                                        lora=training_pb2.LoraOptions(rank=4, **lora))


def _train(stack: TrainingStack, name: str, dataset: str, family: str = "sd1", **lora: Any) -> tuple[Any, Path]:
    spec = _spec(name, dataset, family, **lora)
    final = stack.watch(stack.create(spec, request_id=f"variant-{name}").job.id)[-1]
    assert final.job.state == training_pb2.JOB_STATE_SUCCEEDED, final.job.error
    manifest = stack.registry.adapters.resolve(AdapterRef("default", name))
    folder = stack.settings.data_dir / "fetched" / name
    stack.registry.adapters.fetch_files(manifest, folder)
    return manifest, folder


def _diffusers(folder: Path, adapters: list[tuple[str, Path, float]], family: str = "sd1") -> np.ndarray:
    """Plain diffusers: each file loaded by `load_lora_weights`, then set_adapters + fuse_lora."""
    pipe: Any = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    for name, artifact, _w in adapters:
        pipe.load_lora_weights(str(artifact), weight_name=LORA_WEIGHTS_FILE, adapter_name=name)
    names = [name for name, _a, _w in adapters]
    pipe.set_adapters(names, [w for _n, _a, w in adapters])
    pipe.fuse_lora(adapter_names=names)
    extra = {"max_sequence_length": 512} if family == "flux" else {}  # what our Generate encodes
    with torch.no_grad():
        image = pipe(PROMPT, num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     guidance_scale=by_name(family).part("inference").DEFAULT_GUIDANCE,
                     generator=torch.Generator().manual_seed(SEED), **extra).images[0]
    return np.asarray(image).astype(np.int16)


def _ours(env: InferenceEnv, adapters: list[tuple[str, float]], family: str = "sd1") -> np.ndarray:
    response = env.generate(base_model=f"tiny-{family}", prompt=PROMPT, adapters=adapters, steps=STEPS, width=SIZE,
                            height=SIZE, seed=SEED)
    return pixels(response.images[0].png)


def _keys(artifact: Path) -> list[str]:
    with safe_open(str(artifact / LORA_WEIGHTS_FILE), framework="pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_loads_in_diffusers_and_generates_like_it(
        name: str, served: tuple[TrainingStack, InferenceEnv, str], tiny_family_dirs: dict[str, Path]) -> None:
    stack, env, dataset = served
    family, options = VARIANTS[name]
    manifest, artifact = _train(stack, name, dataset, family, **options)
    config = manifest.training_config
    assert config["use_dora"] is options.get("use_dora", False)
    assert config["conv_rank"] == options.get("conv_rank", 0)
    if "conv_rank" in options:
        assert config["conv_alpha"] == options.get("conv_alpha", options["conv_rank"])
    keys = _keys(artifact)
    assert any("lora_magnitude_vector" in k for k in keys) is bool(options.get("use_dora"))
    assert any(k.startswith("text_encoder.") for k in keys) is bool(options.get("train_text_encoder"))
    assert any(k.endswith("resnets.0.conv1.lora_A.weight") for k in keys) is ("conv_rank" in options)
    ours = _ours(env, [(name, 1.0)], family)
    theirs = _diffusers(tiny_family_dirs[family], [(name, artifact, 1.0)], family)
    base = _ours(env, [], family)
    assert np.abs(theirs - base).max() > 0, "the trained adapter changed nothing"
    assert np.abs(ours - theirs).max() == 0


def test_dora_mixed_with_plain_lora_equals_diffusers(
        served: tuple[TrainingStack, InferenceEnv, str], tiny_family_dirs: dict[str, Path]) -> None:
    stack, env, dataset = served
    _m, plain = _train(stack, "plain", dataset)
    _m, dora = _train(stack, "dora-mix", dataset, use_dora=True, conv_rank=2)
    mix = [("plain", 0.7), ("dora-mix", 0.8)]
    ours = _ours(env, mix)
    theirs = _diffusers(tiny_family_dirs["sd1"], [("plain", plain, 0.7), ("dora-mix", dora, 0.8)])
    assert np.abs(ours - theirs).max() == 0


@pytest.mark.parametrize(("options", "field"), [
    ({"conv_rank": 300}, "spec.lora.conv_rank"),
    ({"conv_alpha": 2.0}, "spec.lora.conv_alpha"),
    ({"conv_rank": 2, "conv_alpha": -1.0}, "spec.lora.conv_alpha"),
])
def test_bad_variant_values_are_invalid_argument_naming_the_field(
        options: dict[str, Any], field: str, served: tuple[TrainingStack, InferenceEnv, str]) -> None:
    stack, _env, dataset = served
    with pytest.raises(grpc.RpcError) as info:
        stack.create(_spec("bad", dataset, **options))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.details()


def test_conv_lora_on_flux_is_failed_precondition(served: tuple[TrainingStack, InferenceEnv, str]) -> None:
    stack, _env, dataset = served
    with pytest.raises(grpc.RpcError) as info:
        stack.create(_spec("bad-flux", dataset, "flux", conv_rank=2))
    err: Any = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "conv_rank" in err.details() and "Conv2d" in err.details()


def test_cli_dora_refuses_ties_and_kohya_export_while_locon_exports(
        served: tuple[TrainingStack, InferenceEnv, str]) -> None:
    stack, env, dataset = served
    result = CliRunner().invoke(app, ["--target", stack.server.target, "train", "lora", "--base", BASE, "--dataset",
                                      dataset, "--name", "dora-x", "--prompt", PROMPT, "--dora", "--conv-rank", "2",
                                      "--steps", "2", "--resolution", str(SIZE)])
    assert result.exit_code == 0, result.output
    config = stack.registry.adapters.resolve(AdapterRef("default", "dora-x")).training_config
    assert config["use_dora"] is True and config["conv_rank"] == 2
    spec = inference_pb2.GenerationSpec(base_model=BASE, prompt=PROMPT, steps=STEPS, width=SIZE, height=SIZE, seed=1,
                                        merge_method=inference_pb2.MERGE_METHOD_TIES, merge_density=0.5,
                                        adapters=[inference_pb2.AdapterWeight(ref={"name": "dora-x"}, weight=1.0)])
    with pytest.raises(grpc.RpcError) as info:
        env.stub.Generate(inference_pb2.GenerateRequest(spec=spec), timeout=120)
    err: Any = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "DoRA" in err.details()
    kohya = registry_pb2.ADAPTER_FORMAT_KOHYA
    request = registry_pb2.ExportAdapterRequest(ref=common_pb2.AdapterRef(name="dora-x"), format=kohya)
    with pytest.raises(grpc.RpcError) as info:
        list(stack.registry_stub.ExportAdapter(request))
    err = info.value
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "DoRA" in err.details()
    _train(stack, "locon-x", dataset, conv_rank=2)
    request = registry_pb2.ExportAdapterRequest(ref=common_pb2.AdapterRef(name="locon-x"), format=kohya)
    exported = b"".join(r.chunk for r in stack.registry_stub.ExportAdapter(request) if r.HasField("chunk"))
    header = exported[8:8 + int.from_bytes(exported[:8], "little")].decode()
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in header and "conv_dim" in header
