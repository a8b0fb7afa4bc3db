"""TrainingService through real gRPC: datasets, job lifecycle without training, every bad input.

No worker runs here (workers=0), so jobs stay QUEUED unless cancelled; training itself is
covered by test_training_e2e.py and test_training_recovery.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from atelier_api.v1 import common_pb2, training_pb2
from services.common.config import Settings
from services.training.metrics import register_store_metrics
from tests.fixtures.grpc_servers import bearer
from tests.fixtures.s3 import write_fake_pipeline
from tests.integration.test_training_support import (
    TI,
    TrainingStack,
    concept_images,
    image_bytes,
    lora_spec,
    noise_image_bytes,
    rpc_error,
    stack_settings,
    upload_messages,
    violation_fields,
)
from tests.unit.test_dataset_validation import png_header_only

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url)
    with TrainingStack(settings, workers=0) as running:
        running.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        yield running


def _dataset_count(stack: TrainingStack) -> int:
    return len(stack.training.ListDatasets(training_pb2.ListDatasetsRequest(page_size=100)).datasets)


def test_upload_get_and_list_datasets(stack: TrainingStack) -> None:
    images = [("a.png", image_bytes("PNG", (80, 64)), "a sks dog on grass"),
              ("b.jpg", image_bytes("JPEG", (64, 96)), ""),
              ("c.webp", image_bytes("WEBP", (70, 70)), "")]
    dataset = stack.upload(images, name="my-dog", chunk=700).dataset
    assert dataset.name == "my-dog" and dataset.id
    assert [(i.index, i.filename, i.width, i.height) for i in dataset.images] == [
        (0, "a.png", 80, 64), (1, "b.jpg", 64, 96), (2, "c.webp", 70, 70)]
    assert dataset.images[0].caption == "a sks dog on grass"
    assert dataset.total_bytes == sum(len(data) for _, data, _ in images)
    got = stack.training.GetDataset(training_pb2.GetDatasetRequest(id=dataset.id)).dataset
    assert got == dataset
    assert [d.id for d in stack.training.ListDatasets(training_pb2.ListDatasetsRequest()).datasets] == [dataset.id]
    err = rpc_error(lambda: stack.training.GetDataset(training_pb2.GetDatasetRequest(id="ds-nope")))
    assert err.code() == grpc.StatusCode.NOT_FOUND


BAD_UPLOADS: dict[str, tuple[list[bytes], str]] = {
    "non-image": ([image_bytes(), b"this is not an image at all"], "images[1]"),
    "truncated": ([image_bytes(), image_bytes(), image_bytes("PNG", (128, 128), pattern=1)[:300]], "images[2]"),
    "bomb": ([png_header_only(40_000, 40_000)], "images[0]"),
    "tiny": ([image_bytes(), image_bytes("PNG", (63, 200))], "images[1]"),
    "gif": ([image_bytes("GIF")], "images[0]"),
    "too-many": ([image_bytes()] * 7, "images[6]"),
    "too-many-bytes": ([noise_image_bytes(200, seed) for seed in range(5)], "images[3]"),  # ~120 KB each
    "empty": ([], "images"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_refused_naming_the_image_and_store_nothing(stack: TrainingStack, case: str) -> None:
    payloads, field = BAD_UPLOADS[case]
    before = _dataset_count(stack)
    err = rpc_error(lambda: stack.upload([(f"f{i}.png", p, "") for i, p in enumerate(payloads)]))
    assert err.code() == INVALID, err.details()
    assert violation_fields(err) == [field]
    assert _dataset_count(stack) == before
    # The server keeps serving: a good upload right after works.
    assert stack.upload(concept_images(2)).dataset.id


def test_out_of_order_chunks_and_bad_names_are_refused(stack: TrainingStack) -> None:
    msgs = [training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(index=1, data=image_bytes()))]
    err = rpc_error(lambda: stack.training.UploadDataset(iter(msgs)))
    assert err.code() == INVALID and violation_fields(err) == ["images[1]"]
    err = rpc_error(lambda: stack.upload(concept_images(1), name="Bad Name!"))
    assert err.code() == INVALID and violation_fields(err) == ["header.name"]


def test_create_is_idempotent_and_jobs_list_get_cancel(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images()).dataset.id
    first = stack.create(lora_spec(ds), request_id="req-42")
    again = stack.create(lora_spec(ds), request_id="req-42")
    assert first.created and not again.created and again.job.id == first.job.id
    job = first.job
    assert job.state == training_pb2.JOB_STATE_QUEUED and job.total_steps == 6 and job.request_id == "req-42"
    assert job.spec == lora_spec(ds) and job.created_at.seconds > 0
    conflict = rpc_error(lambda: stack.create(lora_spec(ds, steps=7), request_id="req-42"))
    assert conflict.code() == grpc.StatusCode.ALREADY_EXISTS
    other = stack.create(lora_spec(ds, output="cat")).job
    ti = stack.create(training_pb2.TrainingJobSpec(
        method=TI, base_model="tiny", dataset_id=ds, output_name="toy", instance_prompt="a <cat-toy> toy",
        textual_inversion=training_pb2.TextualInversionOptions(placeholder_token="<cat-toy>", initializer_token="toy"),
    )).job
    listed = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_size=2))
    assert [j.id for j in listed.jobs] == [ti.id, other.id] and listed.next_page_token
    rest = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_token=listed.next_page_token))
    assert [j.id for j in rest.jobs] == [job.id] and not rest.next_page_token
    only_ti = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(method=TI)).jobs
    assert [j.id for j in only_ti] == [ti.id]
    cancelled = stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=other.id)).job
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    by_state = stack.training.ListTrainingJobs(
        training_pb2.ListTrainingJobsRequest(state=training_pb2.JOB_STATE_CANCELLED)).jobs
    assert [j.id for j in by_state] == [other.id]
    events = stack.watch(other.id, timeout=10)
    assert len(events) == 1 and events[0].job.state == training_pb2.JOB_STATE_CANCELLED
    err = rpc_error(lambda: stack.get("job-missing"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_token="??")))
    assert err.code() == INVALID and violation_fields(err) == ["page_token"]


def test_watch_sends_the_current_state_then_follows_until_terminal(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds)).job
    stream = stack.training.WatchTrainingJob(training_pb2.WatchTrainingJobRequest(id=job.id), timeout=20)
    first = next(stream)
    assert first.job.id == job.id and first.job.state == training_pb2.JOB_STATE_QUEUED
    stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job.id))
    rest = list(stream)
    assert rest[-1].job.state == training_pb2.JOB_STATE_CANCELLED


def _spec_with(ds: str, **hyper: object) -> training_pb2.TrainingJobSpec:
    return lora_spec(ds, **hyper)


def test_bad_job_requests_get_their_code_and_field(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images()).dataset.id
    not_found = [lora_spec(ds, base="no-such-model"), lora_spec("ds-unknown")]
    for spec in not_found:
        assert rpc_error(lambda s=spec: stack.create(s)).code() == grpc.StatusCode.NOT_FOUND
    cases: list[tuple[training_pb2.TrainingJobSpec, str]] = [
        (_spec_with(ds, learning_rate=5.0), "spec.hyperparameters.learning_rate"),
        (_spec_with(ds, max_train_steps=10_000_000), "spec.hyperparameters.max_train_steps"),
        (_spec_with(ds, resolution=4096), "spec.hyperparameters.resolution"),
        (_spec_with(ds, train_batch_size=1000), "spec.hyperparameters.train_batch_size"),
        (_spec_with(ds, noise_offset=3.0), "spec.hyperparameters.noise_offset"),
        (lora_spec(ds, output="Not A Name"), "spec.output_name"),
    ]
    rank_spec = lora_spec(ds)
    rank_spec.lora.rank = 100_000
    cases.append((rank_spec, "spec.lora.rank"))
    no_method = lora_spec(ds)
    no_method.method = common_pb2.ADAPTER_KIND_UNSPECIFIED
    cases.append((no_method, "spec.method"))
    ti = training_pb2.TrainingJobSpec(method=TI, base_model="tiny", dataset_id=ds, output_name="toy",
                                      instance_prompt="a toy",
                                      textual_inversion=training_pb2.TextualInversionOptions(initializer_token="toy"))
    cases.append((ti, "spec.textual_inversion.placeholder_token"))
    for spec, field in cases:
        err = rpc_error(lambda s=spec: stack.create(s))
        assert err.code() == INVALID, (field, err.details())
        assert violation_fields(err) == [field]
    err = rpc_error(lambda: stack.create(lora_spec(ds), request_id="x" * 500))
    assert violation_fields(err) == ["request_id"]
    # Nothing was queued by any of the bad requests, and the server still answers.
    assert stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()).jobs == []
    assert stack.create(lora_spec(ds)).created


def test_every_bad_field_of_a_job_request_comes_back_in_one_invalid_argument(stack: TrainingStack) -> None:
    """services.common.errors.Violations, as inference uses: one BadRequest lists each bad field."""
    ds = stack.upload(concept_images(2)).dataset.id
    h = "spec.hyperparameters."
    err = rpc_error(lambda: stack.create(lora_spec(ds, output="Not A Name", learning_rate=5.0, noise_offset=3.0)))
    assert err.code() == INVALID
    assert violation_fields(err) == ["spec.output_name", h + "learning_rate", h + "noise_offset"]
    # Request fields, unconvertible enum numbers and ranges together; the unset alpha follows the
    # rank, so only the rank is reported.
    spec = lora_spec(ds, optimizer=99, train_batch_size=1000)
    spec.lora.rank = 100_000
    err = rpc_error(lambda: stack.create(spec, request_id="x" * 500))
    assert err.code() == INVALID
    assert violation_fields(err) == ["request_id", h + "optimizer", h + "train_batch_size", "spec.lora.rank"]
    assert stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()).jobs == []


def test_queue_metrics_are_read_from_the_database(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images()).dataset.id
    for _ in range(3):
        stack.create(lora_spec(ds))
    registry = CollectorRegistry()
    register_store_metrics(registry, stack.store)
    assert registry.get_sample_value("atelier_training_queue_depth") == 3
    assert registry.get_sample_value("atelier_training_jobs", {"state": "QUEUED"}) == 3
    assert registry.get_sample_value("atelier_training_jobs", {"state": "RUNNING"}) == 0


def test_tenants_see_only_their_own_datasets_and_jobs(tmp_path: Path, local_settings: Settings,
                                                      sqlite_url: str) -> None:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, auth_enabled=True,
                              api_keys="key-a=alice,key-b=bob")
    with TrainingStack(settings, workers=0) as stack:
        stack.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        alice, bob = bearer("key-a"), bearer("key-b")
        msgs = list(upload_messages(concept_images(2), "mine", 4096))
        ds = stack.training.UploadDataset(iter(msgs), metadata=alice).dataset
        assert ds.tenant == "alice"
        request = training_pb2.CreateTrainingJobRequest(request_id="same", spec=lora_spec(ds.id))
        job = stack.training.CreateTrainingJob(request, metadata=alice).job
        assert job.tenant == "alice"
        # Bob can neither see Alice's dataset nor train on it, nor see, watch or cancel her job.
        err = rpc_error(lambda: stack.training.GetDataset(training_pb2.GetDatasetRequest(id=ds.id), metadata=bob))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = rpc_error(lambda: stack.training.CreateTrainingJob(request, metadata=bob))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        for call in (
            lambda: stack.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=job.id), metadata=bob),
            lambda: stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job.id),
                                                     metadata=bob),
            lambda: list(stack.training.WatchTrainingJob(training_pb2.WatchTrainingJobRequest(id=job.id),
                                                         metadata=bob, timeout=5)),
        ):
            assert rpc_error(call).code() == grpc.StatusCode.NOT_FOUND
        assert stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=bob).jobs == []
        listed = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=alice).jobs
        assert [j.id for j in listed] == [job.id]
        err = rpc_error(lambda: stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
