"""Each training method end to end through gRPC on the tiny random base model.

Upload -> create -> watch to SUCCEEDED -> version 1 in the registry with a complete manifest
-> the artifact loads in plain diffusers. LoRA runs in the cluster shape (PostgreSQL job
store, S3 registry); TI and DreamBooth in the embedded shape (SQLite, local directory).
Also: cancelling a running job stops it within a step and publishes nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from prometheus_client import CollectorRegistry

from atelier_api.v1 import common_pb2, registry_pb2, training_pb2
from services.common.config import Settings
from services.common.errors import AdapterNotFound
from services.registry.refs import AdapterRef
from services.training.convert import config_from_proto, spec_to_dict
from tests.fixtures.models import make_concept_images
from tests.integration.test_training_support import (
    DREAMBOOTH,
    LORA,
    TI,
    TrainingStack,
    lora_spec,
    rpc_error,
    stack_settings,
    violation_fields,
)

pytestmark = pytest.mark.slow


def _png(image: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.getvalue()


def _concept_dataset(stack: TrainingStack) -> str:
    images = [(f"toy{i}.png", _png(img), "") for i, img in enumerate(make_concept_images(4, seed=1, size=64))]
    return str(stack.upload(images, name="toy").dataset.id)


def _spec(method: int, dataset_id: str, steps: int = 4) -> training_pb2.TrainingJobSpec:
    hyper = training_pb2.Hyperparameters(max_train_steps=steps, resolution=32, checkpointing_steps=2, seed=3)
    if method == LORA:
        spec = lora_spec(dataset_id, output="toy-lora", steps=steps, validation_steps=2,
                         validation_prompts=["a photo of sks toy"])
        spec.output_alias = "prod"
        return spec
    if method == TI:
        return training_pb2.TrainingJobSpec(
            method=TI, base_model="tiny", dataset_id=dataset_id, output_name="toy-ti",
            instance_prompt="a photo of a <cat-toy>", hyperparameters=hyper,
            textual_inversion=training_pb2.TextualInversionOptions(placeholder_token="<cat-toy>",
                                                                   initializer_token="toy"),
        )
    return training_pb2.TrainingJobSpec(method=DREAMBOOTH, base_model="tiny", dataset_id=dataset_id,
                                        output_name="toy-db", instance_prompt="a photo of sks toy",
                                        hyperparameters=hyper)


@pytest.fixture(params=["lora", "ti", "dreambooth"])
def method_stack(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_random_pipeline_dir: Path
) -> Iterator[tuple[int, TrainingStack]]:
    method = {"lora": LORA, "ti": TI, "dreambooth": DREAMBOOTH}[request.param]
    if method == LORA:
        registry: Settings = request.getfixturevalue("s3_settings")
        database = request.getfixturevalue("postgres_url")
    else:
        registry = request.getfixturevalue("local_settings")
        database = request.getfixturevalue("sqlite_url")
    with TrainingStack(stack_settings(tmp_path, registry, database), workers=1) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        yield method, stack


def test_method_end_to_end(method_stack: tuple[int, TrainingStack], tiny_random_pipeline_dir: Path,
                           tmp_path: Path) -> None:
    method, stack = method_stack
    ds = _concept_dataset(stack)
    job = stack.create(_spec(method, ds), request_id=f"e2e-{method}").job
    events = stack.watch(job.id, timeout=180)
    final = events[-1]
    assert final.job.state == training_pb2.JOB_STATE_SUCCEEDED, final.job.error
    assert events[0].job.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
    assert final.published.name == job.spec.output_name and final.published.version == 1
    progress = [e for e in events if e.step > 0 and e.loss > 0]
    assert progress and progress[-1].step == 4 and progress[-1].learning_rate > 0
    assert any(e.eta_seconds > 0 for e in progress)
    done = stack.get(job.id)
    assert done.output.version == 1 and done.step == 4 and done.attempts == 1 and done.metrics["final_loss"] > 0

    manifest = stack.registry.adapters.resolve(AdapterRef("default", job.spec.output_name))
    assert manifest.version == 1 and manifest.source_job_id == job.id
    assert manifest.base_model == "tiny"
    assert manifest.base_model_digest == stack.registry.base_models.get("tiny").digest
    assert manifest.training_config["max_train_steps"] == 4
    assert manifest.training_config["seed"] == (7 if method == LORA else 3)
    assert {"final_loss", "steps", "wall_time_seconds"} <= set(manifest.metrics)
    assert stack.registry.checkpoints.latest("default", job.id) is None  # cleaned up after success
    got = stack.registry_stub.GetAdapter(registry_pb2.GetAdapterRequest(
        ref=common_pb2.AdapterRef(name=job.spec.output_name)))
    assert got is not None

    files = stack.registry.adapters.fetch_files(manifest, tmp_path / "artifact")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_random_pipeline_dir, safety_checker=None)
    if method == LORA:
        assert [e for e in events if e.validation_images], "validation previews expected in the stream"
        assert stack.registry.adapters.aliases("default", "toy-lora") == {"prod": 1}
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        pipe.load_lora_weights(str(tmp_path / "artifact"), weight_name="pytorch_lora_weights.safetensors")
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        after = pipe.unet.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    elif method == TI:
        assert manifest.trigger_tokens == ["<cat-toy>"]
        pipe.load_textual_inversion(str(files["learned_embeds.safetensors"]))
        assert "<cat-toy>" in pipe.tokenizer.get_vocab()
    else:
        unet = UNet2DConditionModel.from_pretrained(tmp_path / "artifact" / "unet")
        base = pipe.unet.state_dict()
        assert any(not torch.equal(base[k], v) for k, v in unet.state_dict().items())
    image = pipe("a photo of sks toy", num_inference_steps=2, height=32, width=32,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3)


@pytest.fixture
def sqlite_stack(tmp_path: Path, local_settings: Settings, sqlite_url: str,
                 tiny_random_pipeline_dir: Path) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, heartbeat_seconds=0.2)
    with TrainingStack(settings, workers=1, metrics=CollectorRegistry()) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        yield stack


def test_cancel_mid_run_stops_within_a_step_and_publishes_nothing(sqlite_stack: TrainingStack) -> None:
    stack = sqlite_stack
    ds = _concept_dataset(stack)
    job = stack.create(lora_spec(ds, output="never", steps=2000, checkpointing_steps=1000)).job
    running = stack.wait(job.id, lambda j: j.state == training_pb2.JOB_STATE_RUNNING and j.step >= 2)
    stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job.id))
    cancelled = stack.wait(job.id, lambda j: j.state == training_pb2.JOB_STATE_CANCELLED, timeout=30)
    assert cancelled.step < running.step + 20  # stopped promptly, far from the 2000 steps
    events = stack.store.events_after(job.id, 0)
    requested = next(e for e in events if e.message == "cancel requested")
    final = events[-1]
    assert final.state == "CANCELLED" and final.step - requested.step <= 1  # at most the step in flight
    with pytest.raises(AdapterNotFound):
        stack.registry.adapters.resolve(AdapterRef("default", "never"))
    assert stack.registry.checkpoints.latest("default", job.id) is None
    # The worker is free again: the next job runs to completion.
    nxt = stack.create(lora_spec(ds, output="after", steps=2)).job
    assert stack.wait(nxt.id, lambda j: j.state in (training_pb2.JOB_STATE_SUCCEEDED,
                                                    training_pb2.JOB_STATE_FAILED)).state == \
        training_pb2.JOB_STATE_SUCCEEDED
    # Worker metrics: one step-time sample per step, heartbeats, outcomes, gauges from the DB.
    metrics = stack.metrics
    assert metrics is not None
    steps = metrics.get_sample_value("atelier_training_step_seconds_count", {"method": "LORA"})
    assert steps is not None and steps >= cancelled.step + 2
    assert (metrics.get_sample_value("atelier_training_worker_heartbeats_total", {"result": "ok"}) or 0) > 0
    assert metrics.get_sample_value("atelier_training_worker_jobs_finished_total", {"outcome": "cancelled"}) == 1
    assert metrics.get_sample_value("atelier_training_worker_jobs_finished_total", {"outcome": "succeeded"}) == 1
    assert metrics.get_sample_value("atelier_training_jobs", {"state": "CANCELLED"}) == 1
    assert metrics.get_sample_value("atelier_training_queue_depth") == 0


def test_failed_job_reports_its_error_and_the_worker_carries_on(sqlite_stack: TrainingStack) -> None:
    stack = sqlite_stack
    ds = _concept_dataset(stack)
    bad = training_pb2.TrainingJobSpec(
        method=TI, base_model="tiny", dataset_id=ds, output_name="bad-ti", instance_prompt="a photo of a dog",
        textual_inversion=training_pb2.TextualInversionOptions(placeholder_token="dog", initializer_token="toy"),
        hyperparameters=training_pb2.Hyperparameters(max_train_steps=2, resolution=32),
    )
    # The API refuses it up front, naming the field (the tokenizer is checked at create time)...
    err = rpc_error(lambda: stack.create(bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err) == ["spec.textual_inversion.placeholder_token"]
    # ...and a worker handed such a job anyway (e.g. queued by an older API) fails it for good.
    config = config_from_proto(bad)
    record, _ = stack.store.create_job("default", "legacy-bad-ti", method=config.method, spec=spec_to_dict(bad),
                                       output_name="bad-ti", total_steps=2, config=config.model_dump(mode="json"))
    failed = stack.wait(record.id, lambda j: j.state == training_pb2.JOB_STATE_FAILED)
    assert "placeholder_token" in failed.error and failed.attempts == 1  # permanent: no retry
    good = stack.create(lora_spec(ds, output="ok", steps=2)).job
    assert stack.wait(good.id, lambda j: j.state == training_pb2.JOB_STATE_SUCCEEDED).output.version == 1
