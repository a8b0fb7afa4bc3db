"""Optimizer and lr-schedule choices in the trainer: each one trains, and resumes exactly.

Same small runs as test_trainers.py (tiny random pipeline, 32 px, one thread); the gRPC
surface of these options is covered in test_training_options.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.common.errors import FailedPrecondition
from services.training.trainers import TrainImage
from services.training.trainers.batches import PromptEncoder
from services.training.trainers.captions import CaptionBuilder
from services.training.trainers.models import load_components
from tests.fixtures.models import make_concept_images
from tests.integration.test_trainers import Recorder, _artifact_tensors, config, train


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def concept(tmp_path_factory: pytest.TempPathFactory) -> list[TrainImage]:
    folder = tmp_path_factory.mktemp("concept-optim")
    out = []
    captions = ["red, round, shiny", "", "blue, square", "green"]
    for i, img in enumerate(make_concept_images(4, seed=0, size=64)):
        img.save(folder / f"{i}.png")
        out.append(TrainImage(folder / f"{i}.png", captions[i]))
    return out


RESUME_CASES: dict[str, dict[str, Any]] = {
    "prodigy-restarts": {"method": "LORA", "optimizer": "prodigy", "learning_rate": 1.0,
                         "lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 2, "lr_warmup_steps": 1},
    "adafactor-poly": {"method": "LORA", "optimizer": "adafactor", "lr_scheduler": "polynomial",
                       "lr_power": 2.0, "lr_warmup_steps": 1, "train_text_encoder": True},
    "prodigy-ti-captions": {"method": "TEXTUAL_INVERSION", "optimizer": "prodigy", "learning_rate": 1.0,
                            "instance_prompt": "a photo of <cz>, {caption}", "shuffle_tags": True,
                            "keep_tokens": 1},
    "adafactor-lora-captions": {"method": "LORA", "optimizer": "adafactor", "caption_dropout": 0.5,
                                "shuffle_tags": True, "lr_scheduler": "cosine"},
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_with_a_non_default_optimizer_and_schedule_equals_the_uninterrupted_run(
    case: str, tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    values = dict(RESUME_CASES[case])
    cfg = config(values.pop("method"), max_train_steps=5, checkpointing_steps=2, **values)
    full = Recorder(tmp_path / "a")
    (tmp_path / "a").mkdir()
    straight = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w1", full)
    assert straight.config["optimizer"] == cfg.optimizer
    assert sorted(full.checkpoints) == [2, 4]

    resumed_rec = Recorder(tmp_path)
    resumed = train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w2", resumed_rec,
                    resume_dir=full.checkpoints[2])
    assert resumed.resumed_from_step == 2 and [s[0] for s in resumed_rec.steps] == [3, 4, 5]
    for (_, _, loss_a, lr_a), (_, _, loss_b, lr_b) in zip(full.steps[2:], resumed_rec.steps, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-7)
        assert lr_b == pytest.approx(lr_a)
    a, b = _artifact_tensors(straight), _artifact_tensors(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


def test_eight_bit_adamw_on_a_cpu_run_fails_clearly(
    tiny_random_pipeline_dir: Path, concept: list[TrainImage], tmp_path: Path
) -> None:
    """The worker-side refusal, for a job whose creator believed the device was CUDA."""
    cfg = config("LORA", optimizer="adamw_8bit")
    with pytest.raises(FailedPrecondition, match=r"8-bit AdamW .*needs a CUDA device.*'cpu'"):
        train(cfg, tiny_random_pipeline_dir, concept, tmp_path / "w", Recorder(tmp_path))


def test_shuffled_prompts_are_encoded_live_while_the_fixed_set_stays_cached(tiny_random_pipeline_dir: Path) -> None:
    """Shuffled orders never enter the embedding cache; dropout's "" and the bases do."""
    comps = load_components(tiny_random_pipeline_dir, "cpu", "no")
    captions = CaptionBuilder("a photo of sks toy, {caption}", ["red, round, shiny", ""], dropout=0.5, shuffle=True)
    encoder = PromptEncoder(comps, cached=True, open_ended=captions.open_ended)
    encoder.warm(captions.variants())
    assert encoder.cache is not None and set(captions.variants()) <= set(encoder.cache._cache)
    warmed = len(encoder.cache._cache)
    drawn = [captions.for_batch([0, 1], np.random.default_rng([3, step])) for step in range(12)]
    assert any(p not in encoder.cache for batch in drawn for p in batch)  # some orders are new
    for batch in drawn:
        live = PromptEncoder(comps, cached=False)(batch)
        torch.testing.assert_close(encoder(batch), live, rtol=1e-5, atol=1e-6)
    assert len(encoder.cache._cache) == warmed
