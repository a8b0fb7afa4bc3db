"""Every training method on SDXL and Flux end to end through gRPC, on the tiny random pipelines.

Upload -> CreateTrainingJob -> watch to SUCCEEDED -> version 1 published with `base_family`
recorded -> the denoising loss on the training images (fixed noise, before vs after: metrics
eval_loss_initial / eval_loss_final) went down -> the artifact loads in plain diffusers
(`load_lora_weights`, `load_textual_inversion`, a component folder through `from_pretrained`),
changes what the pipeline generates, and gives the trainer's own final fixed-noise loss (so what
diffusers loaded is exactly the trained state). One embedded stack (SQLite, local registry, one
in-process worker) serves all cases; each job is a few seconds at 32 px.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxTransformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.registry.manifests import AdapterManifest
from services.registry.refs import AdapterRef
from services.training.trainers.evaluate import TRAINING_EVAL_TIMESTEPS, pipeline_denoising_loss
from tests.fixtures.models import make_concept_images
from tests.integration.test_training_support import DREAMBOOTH, LORA, TI, TrainingStack, rpc_error, stack_settings

pytestmark = pytest.mark.slow

TOKEN = "<cat-toy>"
PROMPTS: dict[Any, str] = {LORA: "a photo of sks toy", DREAMBOOTH: "a photo of sks toy", TI: f"a photo of a {TOKEN}"}
DENOISER = {"sdxl": ("unet", UNet2DConditionModel), "flux": ("transformer", FluxTransformer2DModel)}


@dataclass(frozen=True)
class Case:
    family: str
    method: Any  # common_pb2.AdapterKind
    hyper: dict[str, Any] = field(default_factory=dict)
    prior: bool = False
    # The tiny random SDXL UNet is nearly text-blind (swapping the prompt moves its eval loss by
    # ~6e-4 of 1.12), so SDXL TI cannot show learning on it; it must train both encoders'
    # vectors and not diverge. Flux TI (CLIP-L pooled conditioning) does show it.
    learns: bool = True


CASES = {
    "sdxl-lora-text-encoders": Case("sdxl", LORA, {"learning_rate": 1e-2, "train_text_encoder": True,
                                                   "text_encoder_learning_rate": 1e-3}),
    "sdxl-dreambooth-prior": Case("sdxl", DREAMBOOTH, {"learning_rate": 1e-3}, prior=True),
    "sdxl-ti": Case("sdxl", TI, {"learning_rate": 5e-2, "gradient_accumulation_steps": 1}, learns=False),
    "flux-lora-text-encoder": Case("flux", LORA, {"learning_rate": 1e-2, "train_text_encoder": True,
                                                  "text_encoder_learning_rate": 1e-3}),
    "flux-dreambooth": Case("flux", DREAMBOOTH, {"learning_rate": 1e-3}),
    "flux-lora-prior": Case("flux", LORA, {"learning_rate": 1e-2}, prior=True),
    "flux-ti": Case("flux", TI, {"learning_rate": 1e-1, "max_train_steps": 30, "gradient_accumulation_steps": 1}),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_family_dirs: dict[str, Path]) -> Iterator[TrainingStack]:
    root = tmp_path_factory.mktemp("families-stack")
    registry = Settings(registry_url=f"file://{root / 'registry'}", data_dir=root / "var")
    with TrainingStack(stack_settings(root, registry, f"sqlite:///{root / 'jobs.db'}"), workers=1) as running:
        for family in ("sdxl", "flux"):
            running.registry.base_models.import_folder(f"tiny-{family}", tiny_family_dirs[family])
        yield running


@pytest.fixture(scope="module")
def concept_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("families-concept")
    paths = [folder / f"toy{i}.png" for i in range(4)]
    for path, img in zip(paths, make_concept_images(4, seed=1, size=64), strict=True):
        img.save(path, format="PNG")
    return paths


@pytest.fixture(scope="module")
def dataset(stack: TrainingStack, concept_paths: list[Path]) -> str:
    images = [(path.name, path.read_bytes(), "") for path in concept_paths]
    return str(stack.upload(images, name="toy").dataset.id)


def _spec(name: str, case: Case, dataset_id: str) -> training_pb2.TrainingJobSpec:
    hyper: dict[str, Any] = {"max_train_steps": 20, "resolution": 32, "checkpointing_steps": 1000, "seed": 5,
                             **case.hyper}
    spec = training_pb2.TrainingJobSpec(
        method=case.method, base_model=f"tiny-{case.family}", dataset_id=dataset_id, output_name=name,
        instance_prompt=PROMPTS[case.method], hyperparameters=training_pb2.Hyperparameters(**hyper),
    )
    if case.method == LORA:
        spec.lora.rank = 4
    if case.method == TI:
        spec.textual_inversion.placeholder_token = TOKEN
        spec.textual_inversion.initializer_token = "toy"
    if case.prior:
        spec.prior_preservation.enabled = True
        spec.prior_preservation.class_prompt = "a photo of a toy"
        spec.prior_preservation.num_class_images = 2
    return spec


def _generate(pipe: Any, family: str, prompt: str) -> np.ndarray:
    extra = {"max_sequence_length": 32} if family == "flux" else {}
    out = pipe(prompt, num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
               output_type="np", **extra)
    return np.asarray(out.images[0])


def _base(folder: Path, **components: Any) -> Any:
    pipe = DiffusionPipeline.from_pretrained(folder, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_artifact(case: Case, folder: Path, artifact: Path, manifest: AdapterManifest) -> Any:
    """The base pipeline with the published artifact loaded the way diffusers users load it."""
    if case.method == DREAMBOOTH:
        name, cls = DENOISER[case.family]
        return _base(folder, **{name: cls.from_pretrained(artifact / name)})
    pipe = _base(folder)
    if case.method == LORA:
        pipe.load_lora_weights(str(artifact))
        if case.hyper.get("train_text_encoder"):
            assert getattr(pipe.text_encoder, "peft_config", None), "text-encoder LoRA was not loaded"
            if case.family == "sdxl":
                assert getattr(pipe.text_encoder_2, "peft_config", None), "text_encoder_2 LoRA was not loaded"
        return pipe
    assert manifest.trigger_tokens == [TOKEN]
    if case.family == "flux":  # CLIP-L only: the plain diffusers file
        pipe.load_textual_inversion(str(artifact / "learned_embeds.safetensors"), token=TOKEN)
        return pipe
    combined = load_file(str(artifact / "learned_embeds.safetensors"))
    assert set(combined) == {"clip_l", "clip_g"}
    pairs = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))
    for key, encoder, tokenizer in pairs:
        per_encoder = load_file(str(artifact / encoder / "learned_embeds.safetensors"))
        assert torch.equal(per_encoder[TOKEN], combined[key])
        init_id = getattr(pipe, tokenizer).encode("toy", add_special_tokens=False)[0]
        initial = getattr(pipe, encoder).get_input_embeddings().weight[init_id]
        assert not torch.allclose(combined[key][0], initial), f"{key} vectors did not train"
        pipe.load_textual_inversion(str(artifact / encoder / "learned_embeds.safetensors"), token=TOKEN,
                                    text_encoder=getattr(pipe, encoder), tokenizer=getattr(pipe, tokenizer))
    return pipe


@pytest.mark.parametrize("name", list(CASES))
def test_family_method_end_to_end(name: str, stack: TrainingStack, dataset: str, tiny_family_dirs: dict[str, Path],
                                  concept_paths: list[Path], tmp_path: Path) -> None:
    case = CASES[name]
    job = stack.create(_spec(name, case, dataset), request_id=f"families-{name}").job
    final = stack.watch(job.id, timeout=120)[-1]
    assert final.job.state == training_pb2.JOB_STATE_SUCCEEDED, final.job.error
    assert final.published.name == name and final.published.version == 1

    manifest = stack.registry.adapters.resolve(AdapterRef("default", name))
    assert manifest.base_family == case.family and manifest.base_model == f"tiny-{case.family}"
    metrics = manifest.metrics
    if case.learns:
        assert metrics["eval_loss_final"] < metrics["eval_loss_initial"], metrics
    else:
        assert metrics["eval_loss_final"] < metrics["eval_loss_initial"] + 1e-3, metrics

    stack.registry.adapters.fetch_files(manifest, tmp_path / "artifact")
    folder = tiny_family_dirs[case.family]
    prompt = PROMPTS[case.method]
    base_image = _generate(_base(folder), case.family, prompt)
    adapted = _load_artifact(case, folder, tmp_path / "artifact", manifest)
    assert np.abs(_generate(adapted, case.family, prompt) - base_image).max() > 1e-3
    # What plain diffusers loaded *is* the trained state: the trainer's own fixed-noise loss.
    loaded = pipeline_denoising_loss(adapted, concept_paths, [prompt] * len(concept_paths), 32,
                                     timesteps=TRAINING_EVAL_TIMESTEPS)
    assert loaded == pytest.approx(metrics["eval_loss_final"], rel=1e-4)


class _Recorder:
    """Trainer callbacks that keep every checkpoint (as the registry would) and record losses."""

    def __init__(self, keep: Path) -> None:
        self.keep, self.losses, self.checkpoints = keep, [], {}  # type: ignore[var-annotated]
        self.previews: list[int] = []

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        self.losses.append(loss)

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        self.checkpoints[step] = Path(shutil.copytree(state_dir, self.keep / f"ckpt-{step}"))

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None) -> None:
        assert images and images[0][1][:4] == b"\x89PNG" and loss is not None
        self.previews.append(step)


RESUME_CASES = {
    "sdxl-ti": ("sdxl", "TEXTUAL_INVERSION", {"placeholder_token": TOKEN, "initializer_token": "toy",
                                              "num_vectors": 2, "random_flip": True}),
    "sdxl-dreambooth-text-encoders": ("sdxl", "DREAMBOOTH", {"train_text_encoder": True}),
    "flux-lora": ("flux", "LORA", {"train_text_encoder": True, "noise_offset": 0.05, "dropout": 0.1,
                                   "validation_prompts": ["a photo of sks toy"], "validation_steps": 2}),
}


@pytest.mark.parametrize("name", list(RESUME_CASES))
def test_resuming_a_family_run_equals_the_uninterrupted_run(name: str, tiny_family_dirs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    from services.training.trainers import TrainConfig, TrainImage
    from services.training.trainers.engine import run_training

    torch.set_num_threads(1)
    family, method, extra = RESUME_CASES[name]
    images = []
    for i, img in enumerate(make_concept_images(2, seed=1, size=64)):
        img.save(tmp_path / f"{i}.png")
        images.append(TrainImage(tmp_path / f"{i}.png"))
    prompt = f"a photo of a {TOKEN}" if method == "TEXTUAL_INVERSION" else "a photo of sks toy"
    cfg = TrainConfig(method=method, base_model="b", dataset_id="d", output_name="o", instance_prompt=prompt,
                      max_train_steps=4, checkpointing_steps=2, resolution=32, train_batch_size=2,
                      learning_rate=1e-3, seed=3, **extra)

    def train(work: str, rec: _Recorder, resume: Path | None = None) -> Any:
        return run_training(cfg, base_model_dir=tiny_family_dirs[family], images=images, work_dir=tmp_path / work,
                            callbacks=rec, resume_dir=resume)

    (tmp_path / "a").mkdir()
    full = _Recorder(tmp_path / "a")
    straight = train("w1", full)
    resumed_rec = _Recorder(tmp_path)
    resumed = train("w2", resumed_rec, full.checkpoints[2])
    assert resumed.resumed_from_step == 2
    assert resumed_rec.losses == pytest.approx(full.losses[2:], rel=1e-5, abs=1e-7)
    if "validation_prompts" in extra:
        assert full.previews == [2, 4]
    if method == "DREAMBOOTH":  # every trained component, each a from_pretrained folder
        assert {rel.split("/")[0] for rel in straight.files} == {"unet", "text_encoder", "text_encoder_2"}
    for rel, path in straight.files.items():
        if path.suffix == ".safetensors":
            a, b = load_file(str(path)), load_file(str(resumed.files[rel]))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_an_option_the_family_cannot_honour_is_refused_at_create(stack: TrainingStack, dataset: str) -> None:
    spec = _spec("flux-snr", Case("flux", LORA, {"snr_gamma": 5.0}), dataset)
    err = rpc_error(lambda: stack.create(spec))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "min-SNR" in str(err.details()) and "Flux" in str(err.details())
