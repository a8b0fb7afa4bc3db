"""Held-out validation loss, the overfit alarm and publish=best, through the gRPC training API.

The over-trained run is built to overfit: three identical striped images are trained on at a
high rate while the held-out image (the seed's pick, `holdout_indices`) is noise, so every
step towards the stripes moves away from it and the held-out loss climbs after an early low
(measured on CPU at lr 1e-3: 0.1306 at step 4, lowest 0.1304 at step 12, then rising at every
evaluation to 0.1401 at step 40; the alarm fires at step 24).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from atelier.cli.main import app
from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.registry.refs import AdapterRef
from services.training.trainers.base import TrainImage
from services.training.trainers.config import TrainConfig
from services.training.trainers.engine import run_training
from services.training.trainers.heldout import holdout_indices
from tests.integration.test_training_support import (
    TrainingStack,
    image_bytes,
    lora_spec,
    noise_image_bytes,
    rpc_error,
    stack_settings,
    violation_fields,
)

pytestmark = pytest.mark.slow
SEED, STEPS, EVERY = 3, 40, 4
LORA_FILE = "pytorch_lora_weights.safetensors"


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str,
          tiny_pretrained_pipeline_dir: Path) -> Iterator[TrainingStack]:
    with TrainingStack(stack_settings(tmp_path, local_settings, sqlite_url), workers=1) as s:
        s.registry.base_models.import_folder("tiny", tiny_pretrained_pipeline_dir)
        yield s


def overfit_images(count: int = 4) -> list[tuple[str, bytes, str]]:
    held = holdout_indices(count, SEED)
    return [(f"img{i}.png", noise_image_bytes(64, seed=i) if i in held else image_bytes(pattern=1), "")
            for i in range(count)]


def spec(ds: str, output: str, **hyper: object) -> training_pb2.TrainingJobSpec:
    values: dict[str, object] = {"steps": STEPS, "learning_rate": 1.5e-3, "validation_steps": EVERY,
                                 "checkpointing_steps": 1000, "seed": SEED}
    values.update(hyper)
    s = lora_spec(ds, output=output, **values)  # type: ignore[arg-type]
    s.lora.rank = 4
    return s


def run(stack: TrainingStack, job_spec: training_pb2.TrainingJobSpec) -> list[training_pb2.WatchTrainingJobResponse]:
    events = stack.watch(stack.create(job_spec).job.id, timeout=120)
    assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    return events


def lora_tensors(stack: TrainingStack, name: str, dest: Path) -> dict[str, torch.Tensor]:
    manifest = stack.registry.adapters.resolve(AdapterRef("default", name))
    return load_file(str(stack.registry.adapters.fetch_files(manifest, dest)[LORA_FILE]))


def test_overfit_alarm_fires_and_publish_best_picks_the_lowest_earlier_step(
    stack: TrainingStack, tmp_path: Path
) -> None:
    ds = str(stack.upload(overfit_images(), name="overfit").dataset.id)
    events = run(stack, spec(ds, "over", publish="best", overfit_patience=3))

    held = [e for e in events if e.HasField("validation_loss")]
    assert [e.step for e in held] == list(range(EVERY, STEPS + 1, EVERY))
    losses = {e.step: e.validation_loss for e in held}
    best_step = min(losses, key=losses.__getitem__)
    assert 0 < best_step < STEPS and held[-1].best_step == best_step and losses[STEPS] > losses[best_step]
    assert held[-1].best_validation_loss == losses[best_step]
    warned = [e for e in held if e.overfit_warning]
    assert len(warned) == 1 and warned[0].step > best_step and warned[0].message == warned[0].overfit_warning
    rising = [losses[s] for s in range(warned[0].step - 3 * EVERY, warned[0].step + 1, EVERY)]
    assert rising == sorted(rising)  # it rose at the three evaluations before the alarm

    manifest = stack.registry.adapters.resolve(AdapterRef("default", "over"))
    assert manifest.metrics["published_step"] == best_step == manifest.training_config["published_step"]
    assert manifest.metrics["best_validation_loss"] == pytest.approx(losses[best_step])
    assert manifest.metrics["overfit_step"] == warned[0].step and manifest.metrics["num_images"] == 3
    assert stack.get(events[-1].job.id).metrics["overfit_step"] == warned[0].step

    # The published weights are those at best_step: a run stopped there publishes the same tensors.
    run(stack, spec(ds, "at-best", steps=best_step, heldout_validation=True))
    best, reference = lora_tensors(stack, "over", tmp_path / "a"), lora_tensors(stack, "at-best", tmp_path / "b")
    assert best.keys() == reference.keys() and all(torch.equal(best[k], reference[k]) for k in best)


def test_three_images_validate_on_augmented_views(stack: TrainingStack) -> None:
    ds = str(stack.upload([(f"d{i}.png", image_bytes(pattern=i + 1), "") for i in range(3)], name="three").dataset.id)
    events = run(stack, spec(ds, "three", steps=8, heldout_validation=True, overfit_patience=0))
    held = [e for e in events if e.HasField("validation_loss")]
    assert [e.step for e in held] == [4, 8] and all(e.validation_loss > 0 for e in held)
    assert not any(e.overfit_warning for e in held)
    manifest = stack.registry.adapters.resolve(AdapterRef("default", "three"))
    assert manifest.metrics["num_images"] == 3  # nothing held out: all three train
    assert manifest.metrics["validation_augmented"] == 1.0 and manifest.metrics["validation_views"] == 6
    assert manifest.metrics["published_step"] == 8 and manifest.training_config["publish"] == "last"


def test_cli_publish_best_and_overfit_patience(stack: TrainingStack) -> None:
    ds = str(stack.upload([(f"d{i}.png", image_bytes(pattern=i + 1), "") for i in range(3)], name="cli").dataset.id)
    result = CliRunner().invoke(app, ["--target", stack.server.target, "train", "lora", "--base", "tiny", "--dataset",
                                      ds, "--name", "cli-best", "--prompt", "a photo of sks dog", "--steps", "4",
                                      "--resolution", "32", "--publish", "best", "--overfit-patience", "2"])
    assert result.exit_code == 0, result.output
    manifest = stack.registry.adapters.resolve(AdapterRef("default", "cli-best"))
    config = manifest.training_config
    assert config["publish"] == "best" and config["overfit_patience"] == 2 and config["heldout_validation"] is True
    assert config["published_step"] == 4 == manifest.metrics["published_step"]  # validated at the last step only


@pytest.mark.parametrize(("hyper", "field"), [
    ({"publish": "worst"}, "spec.hyperparameters.publish"),
    ({"publish": "best", "heldout_validation": False}, "spec.hyperparameters.publish"),
    ({"overfit_patience": 5000, "heldout_validation": True}, "spec.hyperparameters.overfit_patience"),
    ({"stop_on_overfit": True, "overfit_patience": 0}, "spec.hyperparameters.stop_on_overfit"),
    ({"stop_on_overfit": True, "heldout_validation": False}, "spec.hyperparameters.stop_on_overfit"),
])
def test_bad_validation_options_are_invalid_argument_naming_the_field(
    stack: TrainingStack, hyper: dict[str, object], field: str
) -> None:
    err = rpc_error(lambda: stack.create(spec("any", "bad", **hyper)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violation_fields(err)


class Keep:
    """Engine callbacks that keep every checkpoint directory (the worker uploads them)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.saved: dict[int, Path] = {}

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        self.saved[step] = Path(shutil.copytree(state_dir, self.root / f"ckpt-{step}"))

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None,
                      held_out: dict[str, object] | None = None) -> None:
        pass


def test_a_resumed_run_publishes_the_true_best_and_stop_on_overfit_ends_early(
    tmp_path: Path, tiny_pretrained_pipeline_dir: Path
) -> None:
    images = []
    for name, data, _ in overfit_images():
        (tmp_path / name).write_bytes(data)
        images.append(TrainImage(tmp_path / name))
    fields = {"base_model": "tiny", "dataset_id": "d", "output_name": "o", "instance_prompt": "a photo of sks dog",
              "rank": 4}
    hyper = {"max_train_steps": 24, "learning_rate": 3e-3, "validation_steps": EVERY, "checkpointing_steps": 12,
             "resolution": 32, "seed": SEED, "publish": "best"}
    config = TrainConfig.resolve("LORA", fields, hyper)
    keep = Keep(tmp_path)
    whole = run_training(config, base_model_dir=tiny_pretrained_pipeline_dir, images=images,
                         work_dir=tmp_path / "whole", callbacks=keep)
    resumed = run_training(config, base_model_dir=tiny_pretrained_pipeline_dir, images=images,
                           work_dir=tmp_path / "resumed", callbacks=Keep(tmp_path / "x"), resume_dir=keep.saved[12])
    assert whole.metrics["published_step"] < 12 and resumed.metrics["published_step"] == whole.metrics["published_step"]
    a, b = load_file(str(whole.files[LORA_FILE])), load_file(str(resumed.files[LORA_FILE]))
    assert all(torch.equal(a[k], b[k]) for k in a)

    stopping = TrainConfig.resolve("LORA", fields, {**hyper, "max_train_steps": STEPS, "stop_on_overfit": True})
    early = run_training(stopping, base_model_dir=tiny_pretrained_pipeline_dir, images=images,
                         work_dir=tmp_path / "early", callbacks=Keep(tmp_path / "y"))
    assert not early.stopped and early.steps == early.metrics["overfit_step"] < STEPS and early.files
