"""The mixed-precision CUDA paths of the trainers (skipped where no GPU is present).

CI has no GPU; these ran on an H100 during development (numbers in docs/architecture.md).
bf16 autocast with float32 trainable weights for every method, fp16 with a GradScaler, resume
on the GPU, validation sampling with half-precision frozen parts, and artifacts that load in
plain float32 diffusers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from services.training.trainers import TrainImage
from services.training.trainers.evaluate import TRAINING_EVAL_TIMESTEPS, pipeline_denoising_loss
from tests.integration.test_trainers import (
    METHODS,
    PROMPT,
    Recorder,
    _artifact_tensors,
    concept,
    config,
    load_into,
    train,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
__all__ = ["concept"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_mixed_precision_trains_resumes_and_loads(
    method: str, precision: str, tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    cfg = config(
        method,
        max_train_steps=4,
        checkpointing_steps=2,
        mixed_precision=precision,
        validation_prompts=[PROMPT[method]],
        validation_steps=4,
        gradient_checkpointing=True,
    )
    (tmp_path / "a").mkdir()
    rec = Recorder(tmp_path / "a")
    result = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w1", rec, device="cuda")
    assert result.config["mixed_precision"] == precision
    assert all(math.isfinite(s[2]) for s in rec.steps) and len(rec.validations) == 1
    resumed = train(
        cfg,
        tiny_random_pipeline_dir,
        concept,
        tmp_path / "w2",
        Recorder(tmp_path),
        device="cuda",
        resume_dir=rec.checkpoints[2],
    )
    a, b = _artifact_tensors(result), _artifact_tensors(resumed)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    print(f"{method} {precision}: max |resumed - straight| = {worst:.2e}")
    assert worst < 5e-3  # cuDNN backward kernels are not bit-deterministic; CPU resume is exact
    assert all(v.dtype == torch.float32 for v in a.values())

    pipe = StableDiffusionPipeline.from_pretrained(tiny_random_pipeline_dir, safety_checker=None)
    load_into(pipe, method, result)
    pipe.to("cuda")
    paths, prompts = [i.path for i in concept], [PROMPT[method]] * len(concept)
    loaded = pipeline_denoising_loss(pipe, paths, prompts, 32, timesteps=TRAINING_EVAL_TIMESTEPS)
    print(f"{method} {precision}: fp32 pipeline loss {loaded:.5f} vs trainer {result.metrics['eval_loss_final']:.5f}")
    assert loaded == pytest.approx(result.metrics["eval_loss_final"], rel=5e-2)
