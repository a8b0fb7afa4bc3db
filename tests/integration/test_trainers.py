"""Trainers end to end on the random tiny pipeline: artifacts, resume, stop, validation, bad input.

Each run is a handful of steps at 32 px, so the whole module stays within seconds per test on
one CPU thread; learning itself is shown on the pretrained base in test_trainers_concept.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from services.common.errors import InvalidInput
from services.training.trainers import TrainConfig, TrainImage, TrainResult
from services.training.trainers.engine import run_training
from services.training.trainers.evaluate import TRAINING_EVAL_TIMESTEPS, pipeline_denoising_loss
from tests.fixtures.models import make_concept_images

METHODS = ["LORA", "DREAMBOOTH", "TEXTUAL_INVERSION"]
PROMPT = {"LORA": "a photo of sks toy", "DREAMBOOTH": "a photo of sks toy", "TEXTUAL_INVERSION": "a photo of <cz>"}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def concept(tmp_path_factory: pytest.TempPathFactory) -> list[TrainImage]:
    folder = tmp_path_factory.mktemp("concept")
    out = []
    for i, img in enumerate(make_concept_images(4, seed=0, size=64)):
        img.save(folder / f"{i}.png")
        out.append(TrainImage(folder / f"{i}.png"))
    return out


class Recorder:
    """Callbacks that record everything and keep persisted checkpoints like a registry would."""

    def __init__(self, keep_dir: Path, stop_after: int | None = None) -> None:
        self.keep_dir = keep_dir
        self.stop_after = stop_after
        self.steps: list[tuple[int, int, float, float]] = []
        self.checkpoints: dict[int, Path] = {}
        self.validations: list[tuple[int, list[tuple[str, bytes]]]] = []
        self.validation_losses: list[float | None] = []
        self.stop_checks = 0

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        self.steps.append((step, total, loss, lr))

    def should_stop(self) -> bool:
        self.stop_checks += 1
        return self.stop_after is not None and len(self.steps) >= self.stop_after

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        target = self.keep_dir / f"ckpt-{step}"
        shutil.copytree(state_dir, target)
        self.checkpoints[step] = target

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None) -> None:
        self.validations.append((step, images))
        self.validation_losses.append(loss)


def config(method: str, **overrides: Any) -> TrainConfig:
    values: dict[str, Any] = {
        "method": method,
        "base_model": "tiny",
        "dataset_id": "ds",
        "output_name": "out",
        "instance_prompt": PROMPT[method],
        "max_train_steps": 3,
        "train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "scale_lr": False,
        "seed": 11,
        "checkpointing_steps": 100,
    }
    if method == "TEXTUAL_INVERSION":
        values.update(placeholder_token="<cz>", initializer_token="toy", num_vectors=2)
    values.update(overrides)
    return TrainConfig(**values)


def train(cfg: TrainConfig, base: Path, images: list[TrainImage], work: Path, rec: Recorder, **kw: Any) -> TrainResult:
    return run_training(cfg, base_model_dir=base, images=images, work_dir=work, callbacks=rec, **kw)


def load_into(pipe: Any, method: str, result: TrainResult) -> None:
    """Apply an artifact the way a diffusers user would, from the files alone."""
    if method == "LORA":
        pipe.load_lora_weights(result.files["pytorch_lora_weights.safetensors"].parent)
    elif method == "TEXTUAL_INVERSION":
        pipe.load_textual_inversion(result.files["learned_embeds.safetensors"], token="<cz>")
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(result.files["unet/config.json"].parent)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_and_its_artifact_loads_in_plain_diffusers(
    method: str, tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    rec = Recorder(tmp_path)
    cfg = config(method, validation_prompts=[PROMPT[method]], validation_steps=2)
    result = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "work", rec)

    assert (result.stopped, result.steps, result.kind) == (False, 3, method)
    assert [s[0] for s in rec.steps] == [1, 2, 3] and all(s[1] == 3 for s in rec.steps)
    assert all(p.suffix in {".safetensors", ".json"} and p.is_file() for p in result.files.values())
    assert result.trigger_tokens == (["<cz>", "<cz>_1"] if method == "TEXTUAL_INVERSION" else [])
    assert {"final_loss", "wall_seconds", "steps", "eval_loss_initial", "eval_loss_final"} <= set(result.metrics)
    assert result.config["resolution"] == 32 and result.config["mixed_precision"] == "no"
    assert [v[0] for v in rec.validations] == [2, 3]
    assert all(loss is not None and 0 < loss < 10 for loss in rec.validation_losses)  # the live validation loss
    assert rec.validation_losses[-1] == pytest.approx(result.metrics["eval_loss_final"], rel=1e-4)
    assert rec.validations[0][1][0][0] == PROMPT[method] and rec.validations[0][1][0][1][:4] == b"\x89PNG"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_random_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    load_into(pipe, method, result)
    # The loaded artifact *is* the trained state: same fixed-noise loss the trainer measured.
    paths, prompts = [i.path for i in concept], [PROMPT[method]] * len(concept)
    loaded = pipeline_denoising_loss(pipe, paths, prompts, 32, timesteps=TRAINING_EVAL_TIMESTEPS)
    assert loaded == pytest.approx(result.metrics["eval_loss_final"], rel=1e-4)
    image = pipe(
        PROMPT[method], num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)


def _artifact_tensors(result: TrainResult) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rel, path in result.files.items():
        if path.suffix == ".safetensors":
            out.update({f"{rel}:{k}": v for k, v in load_file(str(path)).items()})
    return out


RESUME_CASES = {
    "LORA": {"dropout": 0.1, "train_text_encoder": True, "random_flip": True, "snr_gamma": 5.0},
    "DREAMBOOTH": {
        "with_prior_preservation": True,
        "class_prompt": "a photo of a toy",
        "num_class_images": 2,
        "noise_offset": 0.05,
    },
    "TEXTUAL_INVERSION": {"gradient_accumulation_steps": 2, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
}


@pytest.mark.parametrize("method", METHODS)
def test_resuming_from_a_checkpoint_equals_the_uninterrupted_run(
    method: str, tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    cfg = config(method, max_train_steps=4, checkpointing_steps=2, **RESUME_CASES[method])
    full = Recorder(tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w1", full)
    assert sorted(full.checkpoints) == [2]  # the final step publishes instead of checkpointing
    if method == "DREAMBOOTH":
        assert len(list((full.checkpoints[2] / "class_images").glob("*.png"))) == 2

    resumed_rec = Recorder(tmp_path)
    resumed = train(
        cfg, tiny_random_pipeline_dir, concept, tmp_path / "w2", resumed_rec, resume_dir=full.checkpoints[2]
    )
    assert resumed.resumed_from_step == 2 and resumed.steps == 4
    if method == "DREAMBOOTH":  # reused, not regenerated, and carried into later checkpoints
        assert len(list((tmp_path / "w2" / "class_images").glob("*.png"))) == 2
    assert [s[0] for s in resumed_rec.steps] == [3, 4]
    for (_, _, loss_a, lr_a), (_, _, loss_b, lr_b) in zip(full.steps[2:], resumed_rec.steps, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
        assert lr_b == pytest.approx(lr_a)
    a, b = _artifact_tensors(straight), _artifact_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_should_stop_ends_within_one_step_and_publishes_nothing(
    tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    rec = Recorder(tmp_path, stop_after=2)
    result = train(config("LORA", max_train_steps=50), tiny_random_pipeline_dir, concept, tmp_path / "w", rec)
    assert (result.stopped, result.steps, result.files) == (True, 2, {})
    assert [s[0] for s in rec.steps] == [1, 2]

    at_once = Recorder(tmp_path, stop_after=0)
    result = train(config("DREAMBOOTH"), tiny_random_pipeline_dir, concept, tmp_path / "w0", at_once)
    assert (result.stopped, result.steps, result.files, at_once.steps) == (True, 0, {}, [])


def test_gradient_checkpointing_changes_memory_not_results(
    tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    runs = []
    for flag in (False, True):
        rec = Recorder(tmp_path)
        train(
            config("LORA", max_train_steps=2, gradient_checkpointing=flag),
            tiny_random_pipeline_dir,
            concept,
            tmp_path / f"w{flag}",
            rec,
        )
        runs.append([s[2] for s in rec.steps])
    assert runs[1] == pytest.approx(runs[0], rel=1e-5)


@pytest.mark.parametrize(
    ("method", "overrides", "field"),
    [
        ("LORA", {"target_modules": ["no_such_layer"]}, "spec.lora.target_modules"),
        (
            "TEXTUAL_INVERSION",
            {"placeholder_token": "toy", "instance_prompt": "a toy"},
            "spec.textual_inversion.placeholder_token",
        ),
        ("TEXTUAL_INVERSION", {"initializer_token": "toy dog"}, "spec.textual_inversion.initializer_token"),
    ],
)
def test_inputs_only_the_base_model_can_judge_are_invalid_input(
    method: str,
    overrides: dict[str, Any],
    field: str,
    tiny_random_pipeline_dir: Path,
    concept: list[TrainImage],
    tmp_path: Path,
) -> None:
    with pytest.raises(InvalidInput) as err:
        train(config(method, **overrides), tiny_random_pipeline_dir, concept, tmp_path / "w", Recorder(tmp_path))
    assert err.value.violations[0].field == field


def test_text_encoder_lora_with_alpha_other_than_rank_loads_exactly(
    tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    cfg = config("LORA", train_text_encoder=True, rank=8, alpha=4.0, text_encoder_learning_rate=1e-2)
    result = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w", Recorder(tmp_path))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_random_pipeline_dir, safety_checker=None)
    load_into(pipe, "LORA", result)
    assert any("lora" in name for name, _ in pipe.text_encoder.named_parameters())
    paths, prompts = [i.path for i in concept], [PROMPT["LORA"]] * len(concept)
    loaded = pipeline_denoising_loss(pipe, paths, prompts, 32, timesteps=TRAINING_EVAL_TIMESTEPS)
    assert loaded == pytest.approx(result.metrics["eval_loss_final"], rel=1e-4)
