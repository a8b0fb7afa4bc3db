"""Optimizer, lr-schedule and caption options through real gRPC (embedded stack, tiny base).

Progress events are emitted every step here (`progress_event_interval_seconds=0`), so the
Watch stream carries the whole learning-rate curve, which is checked against the closed-form
schedules. 8-bit AdamW is refused at creation on a CPU deployment, and a job that reaches a
CPU worker anyway FAILS with the same clear message.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.registry.refs import AdapterRef
from services.training.worker import Worker
from tests.fixtures.models import make_concept_images
from tests.integration.test_training_support import (
    TrainingStack,
    lora_spec,
    rpc_error,
    stack_settings,
    violation_fields,
)

pytestmark = pytest.mark.slow
H = "spec.hyperparameters."
STEPS, WARMUP, LR = 8, 2, 1e-3


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str,
          tiny_random_pipeline_dir: Path) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, progress_event_interval_seconds=0.0)
    with TrainingStack(settings, workers=1) as running:
        running.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        yield running


def _dataset(stack: TrainingStack, captions: list[str] | None = None) -> str:
    captions = captions or [""] * 4
    images = []
    for i, img in enumerate(make_concept_images(4, seed=1, size=64)):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append((f"toy{i}.png", buf.getvalue(), captions[i]))
    return str(stack.upload(images, name="toy").dataset.id)


def _restarts(k: int, cycles: int = 2) -> float:
    if k < WARMUP:
        return k / WARMUP
    progress = (k - WARMUP) / (STEPS - WARMUP)
    return 0.0 if progress >= 1 else 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0)))


def _polynomial(k: int, power: float = 2.0, end: float = 1e-7) -> float:
    if k < WARMUP:
        return k / WARMUP
    return ((LR - end) * (1 - (k - WARMUP) / (STEPS - WARMUP)) ** power + end) / LR


def _spec(dataset: str, output: str, **hyper: object) -> training_pb2.TrainingJobSpec:
    return lora_spec(dataset, output=output, steps=STEPS, checkpointing_steps=100, **hyper)  # type: ignore[arg-type]


def test_each_optimizer_succeeds_is_recorded_and_follows_its_schedule(stack: TrainingStack) -> None:
    ds = _dataset(stack)
    plain = stack.create(_spec(ds, "adamw")).job  # queued first: the others wait behind it
    prodigy = stack.create(_spec(
        ds, "prodigy", optimizer=training_pb2.OPTIMIZER_KIND_PRODIGY, lr_warmup_steps=WARMUP, lr_num_cycles=2,
        lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS)).job
    adafactor = stack.create(_spec(
        ds, "adafactor", optimizer=training_pb2.OPTIMIZER_KIND_ADAFACTOR, learning_rate=LR, lr_warmup_steps=WARMUP,
        lr_power=2.0, lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL)).job
    with ThreadPoolExecutor(3) as pool:
        streams = pool.map(lambda j: stack.watch(j.id, timeout=240), (plain, prodigy, adafactor))
        watched = dict(zip(("adamw", "prodigy", "adafactor"), streams, strict=True))
    expected = {"adamw": ("adamw", "constant"), "prodigy": ("prodigy", "cosine_with_restarts"),
                "adafactor": ("adafactor", "polynomial")}
    for name, events in watched.items():
        assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
        config = stack.registry.adapters.resolve(AdapterRef("default", name)).training_config
        assert (config["optimizer"], config["lr_scheduler"]) == expected[name]
        assert events[-1].job.metrics["final_loss"] > 0
    assert stack.registry.adapters.resolve(AdapterRef("default", "prodigy")).training_config["learning_rate"] == 1.0
    curves = {name: {e.step: e.learning_rate for e in watched[name] if e.step > 0 and e.loss > 0}
              for name in ("prodigy", "adafactor")}
    assert sorted(curves["prodigy"]) == list(range(1, STEPS + 1)) == sorted(curves["adafactor"])
    for k in range(1, STEPS + 1):  # the lr reported after optimizer step k is the schedule at k
        assert curves["prodigy"][k] == pytest.approx(1.0 * _restarts(k), abs=1e-9)
        assert curves["adafactor"][k] == pytest.approx(LR * _polynomial(k), rel=1e-6)


def test_caption_template_dropout_and_shuffling_train_and_are_recorded(stack: TrainingStack) -> None:
    ds = _dataset(stack, ["red, round, shiny", "", "blue, square", "green, tall"])
    spec = _spec(ds, "captioned", caption_dropout=0.25, shuffle_tags=True, keep_tokens=1)
    spec.instance_prompt = "a photo of sks toy, {caption}"
    events = stack.watch(stack.create(spec).job.id, timeout=240)
    assert events[-1].job.state == training_pb2.JOB_STATE_SUCCEEDED, events[-1].job.error
    config = stack.registry.adapters.resolve(AdapterRef("default", "captioned")).training_config
    assert config["instance_prompt"] == "a photo of sks toy, {caption}"
    assert (config["caption_dropout"], config["shuffle_tags"], config["keep_tokens"]) == (0.25, True, 1)


@pytest.mark.parametrize(
    ("hyper", "field"),
    [
        ({"optimizer": training_pb2.OPTIMIZER_KIND_ADAMW_8BIT}, "optimizer"),
        ({"keep_tokens": 2}, "keep_tokens"),
        ({"caption_dropout": 1.0}, "caption_dropout"),
        ({"lr_num_cycles": 0}, "lr_num_cycles"),
        ({"lr_scheduler": "linear", "lr_scheduler_kind": training_pb2.LR_SCHEDULER_KIND_COSINE}, "lr_scheduler_kind"),
    ],
)
def test_bad_options_are_invalid_argument_naming_the_field(
    tmp_path: Path, local_settings: Settings, sqlite_url: str, hyper: dict[str, object], field: str
) -> None:
    with TrainingStack(stack_settings(tmp_path, local_settings, sqlite_url), workers=0) as idle:
        idle.registry.base_models.import_folder("tiny", _fake_base(tmp_path))
        err = rpc_error(lambda: idle.create(_spec(_dataset(idle), "bad", **hyper)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err) == [H + field]
    if field == "optimizer":
        assert "CUDA" in (err.details() or "") and "'cpu'" in (err.details() or "")


def _fake_base(tmp_path: Path) -> Path:
    from tests.fixtures.s3 import write_fake_pipeline

    return write_fake_pipeline(tmp_path / "fake-sd")


def test_an_eight_bit_job_that_reaches_a_cpu_worker_fails_with_a_clear_message(
    tmp_path: Path, local_settings: Settings, sqlite_url: str, tiny_random_pipeline_dir: Path
) -> None:
    """The API was told it trains on CUDA; the worker that claims the job trains on the CPU."""
    api = stack_settings(tmp_path, local_settings, sqlite_url, training_device="cuda")
    with TrainingStack(api, workers=0) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        job = stack.create(_spec(_dataset(stack), "eight", optimizer=training_pb2.OPTIMIZER_KIND_ADAMW_8BIT)).job
        cpu = stack_settings(tmp_path, local_settings, sqlite_url, training_device="cpu")
        assert Worker(cpu, stack.store, stack.registry, worker_id="cpu-worker").run_once()
        failed = stack.get(job.id)
    assert failed.state == training_pb2.JOB_STATE_FAILED and failed.attempts == 1
    assert "8-bit AdamW" in failed.error and "CUDA" in failed.error and "'cpu'" in failed.error
