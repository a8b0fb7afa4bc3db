"""What our trainers publish, served by our Generate, equals plain diffusers with the same files.

One registry (local directory) shared by a training stack and an inference server, both on real
gRPC: the tiny random SDXL and Flux bases are imported, each method trains a few steps through
the TrainingService, and Generate with the published version is compared, pixel for pixel on
CPU, with plain diffusers loading the artifact the way its users do (`load_lora_weights` +
`fuse_lora`, `load_textual_inversion`, component folders through `from_pretrained`). The
adapter-side equality with hand-built adapters is in test_inference_families.py; this closes the
loop over the trainers' real file layouts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from atelier_api.v1 import training_pb2
from services.families import by_name
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from services.registry.refs import AdapterRef
from tests.integration.test_inference_support import InferenceEnv, pixels
from tests.integration.test_training_families import Case as TrainCase
from tests.integration.test_training_families import _spec
from tests.integration.test_training_support import DREAMBOOTH, LORA, TI, TrainingStack
from tests.integration.train_and_serve_support import train_and_serve, upload_concept

pytestmark = pytest.mark.slow

TOKEN = "<cat-toy>"
PROMPT = {LORA: "a photo of sks toy on a blue floor", DREAMBOOTH: "a photo of sks toy", TI: f"a photo of a {TOKEN}"}
STEPS, SIZE, SEED = 3, 32, 4
COMPONENT_CLASSES: dict[str, Any] = {"unet": UNet2DConditionModel, "transformer": FluxTransformer2DModel,
                                     "text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
CASES = {
    "sdxl-lora": TrainCase("sdxl", LORA, {"learning_rate": 1e-2, "train_text_encoder": True}),
    "sdxl-dreambooth": TrainCase("sdxl", DREAMBOOTH, {"learning_rate": 1e-3, "train_text_encoder": True}),
    "sdxl-ti": TrainCase("sdxl", TI, {"learning_rate": 5e-2}),
    "flux-lora": TrainCase("flux", LORA, {"learning_rate": 1e-2, "train_text_encoder": True}),
    "flux-dreambooth": TrainCase("flux", DREAMBOOTH, {"learning_rate": 1e-3}),
    "flux-ti": TrainCase("flux", TI, {"learning_rate": 1e-1}),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           tiny_family_dirs: dict[str, Path]) -> Iterator[tuple[TrainingStack, InferenceEnv]]:
    with train_and_serve(tmp_path_factory.mktemp("trained-generate"), tiny_family_dirs, ("sdxl", "flux")) as both:
        yield both


def _train(stack: TrainingStack, name: str, case: TrainCase) -> Path:
    dataset = upload_concept(stack, name)
    spec = _spec(name, TrainCase(case.family, case.method, {"max_train_steps": 8, **case.hyper}), dataset)
    spec.instance_prompt = PROMPT[case.method]
    final = stack.watch(stack.create(spec, request_id=f"trained-{name}").job.id, timeout=120)[-1]
    assert final.job.state == training_pb2.JOB_STATE_SUCCEEDED, final.job.error
    return _fetch(stack, name)


def _fetch(stack: TrainingStack, name: str) -> Path:
    manifest = stack.registry.adapters.resolve(AdapterRef("default", name))
    folder = stack.settings.data_dir / "fetched" / name
    stack.registry.adapters.fetch_files(manifest, folder)
    return folder


def _reference(folder: Path, case: TrainCase, artifact: Path) -> np.ndarray:
    """Plain diffusers: the base folder, the artifact loaded as diffusers users load it."""
    family = by_name(case.family)
    components = {}
    if case.method == DREAMBOOTH:
        components = {name: COMPONENT_CLASSES[name].from_pretrained(artifact / name)
                      for name in family.components if (artifact / name / "config.json").is_file()}
        assert family.denoiser in components
    pipe: Any = DiffusionPipeline.from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    if case.method == LORA:
        pipe.load_lora_weights(str(artifact), weight_name=LORA_WEIGHTS_FILE, adapter_name="trained")
        pipe.set_adapters(["trained"], [1.0])
        pipe.fuse_lora(adapter_names=["trained"])
    if case.method == TI:
        stored = load_file(str(artifact / TI_EMBEDS_FILE))
        for slot in family.ti_slots:
            vectors = stored[slot.ti_key] if slot.ti_key in stored else stored[TOKEN]
            pipe.load_textual_inversion(vectors, token=TOKEN, text_encoder=getattr(pipe, slot.encoder),
                                        tokenizer=getattr(pipe, slot.tokenizer))
    extra = {"max_sequence_length": 512} if case.family == "flux" else {}
    with torch.no_grad():
        image = pipe(PROMPT[case.method], num_inference_steps=STEPS, height=SIZE, width=SIZE,
                     guidance_scale=family.part("inference").DEFAULT_GUIDANCE,
                     generator=torch.Generator().manual_seed(SEED), **extra).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("name", list(CASES))
def test_trained_artifact_generates_what_plain_diffusers_makes_of_it(
        name: str, served: tuple[TrainingStack, InferenceEnv], tiny_family_dirs: dict[str, Path]) -> None:
    stack, env = served
    case = CASES[name]
    artifact = _train(stack, name, case)
    response = env.generate(base_model=f"tiny-{case.family}", prompt=PROMPT[case.method], adapters=[(name, 1.0)],
                            steps=STEPS, width=SIZE, height=SIZE, seed=SEED)
    ours = pixels(response.images[0].png)
    theirs = _reference(tiny_family_dirs[case.family], case, artifact)
    base = pixels(env.generate(base_model=f"tiny-{case.family}", prompt=PROMPT[case.method], steps=STEPS,
                               width=SIZE, height=SIZE, seed=SEED).images[0].png)
    assert np.abs(ours - base).max() > 0, "the trained adapter changed nothing"
    assert np.abs(ours - theirs).max() == 0
