"""Generate on SDXL and Flux base models equals plain diffusers, through the real InferenceService.

Real gRPC on loopback, registry on moto S3, the tiny random SDXL and Flux pipelines
(`tiny_family_dirs`) at 32 px, 3 steps. Every adapter here is built independently of our
trainers and of services/inference: peft `LoraConfig` on the tiny denoiser (and text encoders)
with random non-zero lora_B, written by the family pipeline class's own `save_lora_weights`;
Textual Inversion = random vectors in the stored layouts ({"clip_l", "clip_g"} for SDXL,
{"clip_l"} for Flux); DreamBooth = a perturbed denoiser folder. The references load the same
files with diffusers' `load_lora_weights` / `set_adapters` / `fuse_lora`, `load_textual_inversion`
and `from_pretrained`. Equality is exact (max abs diff 0 on uint8): the service merges LoRAs as
peft's `merge` does (see test_inference_equivalence.py for SD 1.x).
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from PIL import Image as PILImage
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from atelier_api.v1 import inference_pb2
from services.common.errors import InvalidInput
from services.families import by_name
from services.inference.pipelines import folder_digest
from services.inference.types import GenerationRequest
from services.inference.validation import check_size_multiple
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from tests.fixtures.s3 import MotoServer
from tests.integration.test_inference_support import (
    SIZE,
    STEPS,
    TENANT,
    InferenceEnv,
    engine_settings,
    pixels,
    rpc_error,
    start_env,
)

TOKEN = "<concept>"
FAMILIES = ("sdxl", "flux")
BASES = {"sdxl": "tiny-sdxl", "flux": "tiny-flux"}
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
DENOISER_TARGETS = {"sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
                    "flux": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                             "to_add_out"]}
TEXT_ENCODERS = {"sdxl": (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)),
                 "flux": (("text_encoder", CLIPTextModel),)}


# --- adapters, built with peft and diffusers only -----------------------------------------
def _random_lora(model: torch.nn.Module, targets: list[str], seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """peft's own injection on `model`, then random A and (non-zero) B in its state dict."""
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), model)
    gen = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(model)
    return {k: torch.randn(v.shape, generator=gen) * (0.1 if "lora_B" in k else 0.3) for k, v in state.items()}


def _metadata(targets: list[str], rank: int = 4) -> dict[str, Any]:
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets).to_dict()


def write_lora(family: str, base: Path, out: Path, seed: int, text: bool) -> Path:
    """A LoRA as diffusers' training scripts save it (alpha = 2 rank, recorded in the header)."""
    targets = DENOISER_TARGETS[family]
    kwargs: dict[str, Any] = {}
    if family == "sdxl":
        unet = UNet2DConditionModel.from_pretrained(base / "unet")
        kwargs |= {"unet_lora_layers": convert_state_dict_to_diffusers(_random_lora(unet, targets, seed)),
                   "unet_lora_adapter_metadata": _metadata(targets)}
    else:
        transformer = FluxTransformer2DModel.from_pretrained(base / "transformer")
        kwargs |= {"transformer_lora_layers": _random_lora(transformer, targets, seed),
                   "transformer_lora_adapter_metadata": _metadata(targets)}
    if text:
        for i, (name, cls) in enumerate(TEXT_ENCODERS[family]):
            encoder = cls.from_pretrained(base / name)
            layers = _random_lora(encoder, TEXT_TARGETS, seed + 10 + i)
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(layers) if family == "sdxl" else layers
            kwargs[f"{name}_lora_adapter_metadata"] = _metadata(TEXT_TARGETS)
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else FluxPipeline
    out.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(out, safe_serialization=True, **kwargs)
    return out / "pytorch_lora_weights.safetensors"


def write_ti(family: str, out: Path, seed: int, vectors: int = 2) -> dict[str, Path]:
    """The stored TI layout: one tensor per text encoder (SDXL: clip_l + clip_g; Flux: clip_l),
    plus, for SDXL, diffusers' per-encoder files next to it as the trainer publishes them."""
    gen = torch.Generator().manual_seed(seed)
    keys = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"} if family == "sdxl" else {"clip_l": ""}
    tensors = {key: torch.randn(vectors, 32, generator=gen) for key in keys}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TI_EMBEDS_FILE))
    files = {TI_EMBEDS_FILE: out / TI_EMBEDS_FILE}
    for key, encoder in keys.items():
        if encoder:
            (out / encoder).mkdir(exist_ok=True)
            save_file({TOKEN: tensors[key]}, str(out / encoder / TI_EMBEDS_FILE))
            files[f"{encoder}/{TI_EMBEDS_FILE}"] = out / encoder / TI_EMBEDS_FILE
    return files


def write_dreambooth(family: str, base: Path, out: Path, seed: int) -> dict[str, Path]:
    """A perturbed copy of the denoiser (unet/ or transformer/): manifest path -> file."""
    name, cls = ("unet", UNet2DConditionModel) if family == "sdxl" else ("transformer", FluxTransformer2DModel)
    model = cls.from_pretrained(base / name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(out / name, safe_serialization=True)
    return {f"{name}/{path.name}": path for path in sorted((out / name).iterdir())}


# --- the environment ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_family_dirs: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-families")
    dirs = {family: tiny_family_dirs[family] for family in FAMILIES}
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, dirs["sdxl"],
                               base_model_paths=",".join(f"{BASES[f]}={dirs[f]}" for f in FAMILIES),
                               batch_wait_ms=200.0)
    env = start_env(settings, dirs["sdxl"])
    for family in FAMILIES:
        for seed, (suffix, text) in enumerate((("lora-1", False), ("lora-2", True), ("cold", False))):
            path = write_lora(family, dirs[family], tmp / f"{family}-{suffix}", seed=seed, text=text)
            publish(env, family, f"{family}-{suffix}", "LORA", {LORA_WEIGHTS_FILE: path})
        ti = write_ti(family, tmp / f"{family}-ti", seed=20)
        publish(env, family, f"{family}-ti", "TEXTUAL_INVERSION", ti, trigger_tokens=[TOKEN])
        publish(env, family, f"{family}-db", "DREAMBOOTH",
                write_dreambooth(family, dirs[family], tmp / f"{family}-db", seed=3))
    yield env
    env.close()


def publish(env: InferenceEnv, family: str, name: str, kind: str, files: dict[str, Path], **kw: Any) -> None:
    base_dir = env.settings.local_base_models()[BASES[family]]
    env.registry.adapters.publish(TENANT, name, kind=kind, base_model=BASES[family],  # type: ignore[arg-type]
                                  base_model_digest=folder_digest(base_dir), files=files, base_family=family, **kw)
    env.files[name] = files


def base_dir(env: InferenceEnv, family: str) -> Path:
    return env.settings.local_base_models()[BASES[family]]


def ours(env: InferenceEnv, family: str, adapters: list[tuple[str, float]] = (), **kw: Any) -> np.ndarray:  # type: ignore[assignment]
    response = env.generate(base_model=BASES[family], adapters=adapters, **kw)
    return pixels(response.images[0].png)


def reference(env: InferenceEnv, family: str, prompt: str = "a red box", seed: int = 1,
              loras: list[tuple[str, float]] = (), ti: str | None = None,  # type: ignore[assignment]
              dreambooth: str | None = None, mode: str = "txt2img", **call: Any) -> np.ndarray:
    """The same generation with nothing but diffusers (plain pipeline, its own loaders)."""
    folder = base_dir(env, family)
    loader = {"txt2img": DiffusionPipeline, "img2img": AutoPipelineForImage2Image,
              "inpaint": AutoPipelineForInpainting}[mode]
    pipe: Any = loader.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if dreambooth is not None:
        name, cls = ("unet", UNet2DConditionModel) if family == "sdxl" else ("transformer", FluxTransformer2DModel)
        setattr(pipe, name, cls.from_pretrained(env.files[dreambooth][f"{name}/config.json"].parent))
    for i, (name, _weight) in enumerate(loras):
        file = env.files[name][LORA_WEIGHTS_FILE]
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=f"ref{i}")
    if loras:
        names = [f"ref{i}" for i in range(len(loras))]
        pipe.set_adapters(names, [w for _n, w in loras])
        pipe.fuse_lora(adapter_names=names)
    if ti is not None:
        tensors = load_file(str(env.files[ti][TI_EMBEDS_FILE]))
        pipe.load_textual_inversion(tensors["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        if "clip_g" in tensors:
            pipe.load_textual_inversion(tensors["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    extra = {"max_sequence_length": 512} if family == "flux" else {}  # FluxPipeline's default, stated
    guidance = by_name(family).part("inference").DEFAULT_GUIDANCE  # what an unset guidance means
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=STEPS, height=SIZE, width=SIZE, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(seed), **extra, **call).images[0]
    return np.asarray(image).astype(np.int16)


# --- equality with diffusers ----------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_base_only_equals_diffusers(env: InferenceEnv, family: str) -> None:
    assert np.array_equal(ours(env, family), reference(env, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_lora_with_text_encoder_layers_equals_diffusers(env: InferenceEnv, family: str) -> None:
    name = f"{family}-lora-2"  # denoiser + every text encoder the family trains LoRAs for
    image = ours(env, family, [(name, 0.8)])
    assert np.array_equal(image, reference(env, family, loras=[(name, 0.8)]))
    assert not np.array_equal(image, ours(env, family))  # the LoRA did something
    pipe = env.engine.pipelines.get(BASES[family]).pipe
    adapted = env.on_device(lambda: {m.prefix for m in env.engine.device_state.mergers.for_pipeline(pipe)
                                     if m.has_adapters()})
    assert adapted == {"unet" if family == "sdxl" else "transformer", *(n for n, _c in TEXT_ENCODERS[family])}


@pytest.mark.parametrize("family", FAMILIES)
def test_two_loras_mixed_with_weights_equal_diffusers(env: InferenceEnv, family: str) -> None:
    mix = [(f"{family}-lora-1", 1.0), (f"{family}-lora-2", -0.6)]
    fast = env.engine.device_state.attaches["fast"]
    assert np.array_equal(ours(env, family, mix), reference(env, family, loras=mix))
    # lora-1 attached next to lora-2 through the fast path (its targets were wrapped already).
    assert env.engine.device_state.attaches["fast"] == fast + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_textual_inversion_equals_diffusers(env: InferenceEnv, family: str) -> None:
    """SDXL: both encoders take their own vectors; Flux: CLIP-L does, T5 reads the raw text."""
    prompt = f"a photo of {TOKEN} on a table"
    image = ours(env, family, [(f"{family}-ti", 1.0)], prompt=prompt)
    assert np.array_equal(image, reference(env, family, prompt=prompt, ti=f"{family}-ti"))
    assert not np.array_equal(image, reference(env, family, prompt=prompt))


@pytest.mark.parametrize("family", FAMILIES)
def test_dreambooth_denoiser_with_a_lora_equals_diffusers(env: InferenceEnv, family: str) -> None:
    base = ours(env, family)
    adapters = [(f"{family}-db", 1.0), (f"{family}-lora-1", 0.5)]
    expected = reference(env, family, dreambooth=f"{family}-db", loras=[(f"{family}-lora-1", 0.5)])
    assert np.array_equal(ours(env, family, adapters), expected)
    assert np.array_equal(ours(env, family), base)  # the base pipeline is untouched by the swap


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


INIT = _png(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
MASK = _png(np.repeat(np.array([0, 255], np.uint8), SIZE // 2)[None, :].repeat(SIZE, 0))  # repaint the right half


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_and_inpaint_with_a_lora_equal_diffusers(env: InferenceEnv, family: str, mode: str) -> None:
    """diffusers' own Img2Img / Inpaint pipeline of the family, sharing the base's components."""
    images = {"image": PILImage.open(io.BytesIO(INIT))}
    extra: dict[str, Any] = {"init_image": INIT, "strength": 0.6}
    if mode == "inpaint":
        images["mask_image"] = PILImage.open(io.BytesIO(MASK))
        extra["mask_image"] = MASK
    lora = [(f"{family}-lora-2", 0.7)]
    image = ours(env, family, lora, **extra)
    assert np.array_equal(image, reference(env, family, loras=lora, mode=mode, strength=0.6, **images))


def test_batched_flux_requests_are_byte_identical_to_solo_runs(env: InferenceEnv) -> None:
    jobs = [dict(prompt="a red box", seed=5), dict(prompt="a blue cat", seed=6, num_images=2)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda kw: env.generate(base_model=BASES["flux"], **kw), jobs))
    assert max(r.batch_size for r in batched) > 1
    for kw, together in zip(jobs, batched, strict=True):
        alone = env.generate(base_model=BASES["flux"], **kw)
        assert [i.png for i in together.images] == [i.png for i in alone.images]


def test_flux_requests_with_different_loras_share_one_transformer_forward(env: InferenceEnv) -> None:
    """Per-sample LoRA deltas (hetero.py) on the transformer's layers; within the SD 1.x
    tolerance of their solo (merged) images: W x + B A x is not (W + B A) x bit for bit."""
    jobs = [[("flux-lora-1", 1.0)], [("flux-lora-2", 0.5)], [("flux-lora-1", -0.5), ("flux-lora-2", 1.0)]]
    hetero = env.engine.runner.paths["hetero"]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda mix: ours(env, "flux", mix, seed=4), jobs))
    assert env.engine.runner.paths["hetero"] > hetero
    for mix, together in zip(jobs, batched, strict=True):
        assert int(np.abs(together - ours(env, "flux", mix, seed=4)).max()) <= 2, mix


# --- tiers, single flight, families -----------------------------------------------------------
def test_cold_flux_lora_loads_once_for_concurrent_requests_through_every_tier(env: InferenceEnv) -> None:
    name = "flux-cold"
    reads, loads = dict(env.store.blob_reads()), {t.name: t.loads for t in env.engine.tier_status()}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda seed: env.generate(base_model=BASES["flux"], adapters=[(name, 1.0)], seed=seed),
                                (11, 11)))
    fetched = {d: n - reads.get(d, 0) for d, n in env.store.blob_reads().items() if n != reads.get(d, 0)}
    assert list(fetched.values()) == [1], fetched  # one download of the one LoRA blob, for both requests
    # One load per tier (disk: the blob, host: the parsed state dict, device: the attach).
    assert {t.name: t.loads - loads[t.name] for t in env.engine.tier_status()} == {"disk": 1, "host": 1, "device": 1}
    assert results[0].images[0].png == results[1].images[0].png
    status = env.engine.tier_status()
    assert set(fetched) <= {e.key for e in status[0].entries}
    assert all(any(f"{name}@1" in e.key for e in tier.entries) for tier in status[1:])


def test_an_sdxl_adapter_on_a_flux_base_is_refused_naming_both_families(env: InferenceEnv) -> None:
    before = dict(env.store.blob_reads())
    err = rpc_error(lambda: env.generate(base_model=BASES["flux"], adapters=[("sdxl-lora-1", 1.0)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    message = err.details() or ""
    assert "Stable Diffusion XL (sdxl)" in message and "Flux (flux)" in message, message
    assert env.store.blob_reads() == before  # refused before any adapter bytes were fetched


def test_a_legacy_adapter_is_checked_by_its_base_models_recorded_family(env: InferenceEnv) -> None:
    """No base_family in the adapter manifest (published before it was recorded): the family of
    the registry base model it names decides, still before any adapter bytes are fetched."""
    manifest = env.registry.base_models.import_folder("reg-sdxl", base_dir(env, "sdxl"))
    assert manifest.family == "sdxl"
    env.registry.adapters.publish(TENANT, "legacy-sdxl", kind="LORA", base_model="reg-sdxl",
                                  base_model_digest=manifest.digest,
                                  files={LORA_WEIGHTS_FILE: env.files["sdxl-lora-1"][LORA_WEIGHTS_FILE]})
    before = dict(env.store.blob_reads())
    err = rpc_error(lambda: env.generate(base_model=BASES["flux"], adapters=[("legacy-sdxl", 1.0)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "(sdxl)" in (err.details() or "") and "(flux)" in (err.details() or ""), err.details()
    assert env.store.blob_reads() == before


def test_sdxl_textual_inversion_needs_vectors_for_both_encoders(env: InferenceEnv, tmp_path: Path) -> None:
    path = tmp_path / TI_EMBEDS_FILE
    save_file({"emb_params": torch.randn(1, 32)}, str(path))  # an SD 1.x-style single-encoder file
    publish(env, "sdxl", "sdxl-ti-one", "TEXTUAL_INVERSION", {TI_EMBEDS_FILE: path}, trigger_tokens=[TOKEN])
    err = rpc_error(lambda: env.generate(base_model=BASES["sdxl"], prompt=TOKEN, adapters=[("sdxl-ti-one", 1.0)]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'clip_l' and 'clip_g'" in (err.details() or ""), err.details()


def test_flux_sides_must_be_whole_latent_patches() -> None:
    """Flux-dev's VAE factor 8 x 2x2 packing: 16 px (diffusers would round 520 down silently)."""
    with pytest.raises(InvalidInput) as caught:
        check_size_multiple(GenerationRequest("flux-dev", "p", width=520), 520, 512, 16, "flux-dev")
    assert [v.field for v in caught.value.violations] == ["spec.width"]


def test_flux_refuses_a_ddpm_scheduler_with_a_clear_error(env: InferenceEnv) -> None:
    err = rpc_error(lambda: env.generate(base_model=BASES["flux"], scheduler=inference_pb2.SCHEDULER_KIND_DDIM))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Flux" in (err.details() or "")


def test_flux_refuses_a_negative_prompt_instead_of_ignoring_it(env: InferenceEnv) -> None:
    err = rpc_error(lambda: env.generate(base_model=BASES["flux"], negative_prompt="blurry"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "negative" in (err.details() or "") and "Flux" in (err.details() or "")
