"""CreateTrainingJob through real gRPC reports every bad field of a request at once.

One INVALID_ARGUMENT carries a google.rpc.BadRequest with a field violation per bad field
(services.common.errors.Violations, as inference does), so a client fixes its request in
one round trip; nothing is queued.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from tests.fixtures.s3 import write_fake_pipeline
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    rpc_error,
    stack_settings,
    violation_fields,
)

H = "spec.hyperparameters."


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url)
    with TrainingStack(settings, workers=0) as running:
        running.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        yield running


def _no_jobs(stack: TrainingStack) -> bool:
    return not stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()).jobs


def test_three_bad_fields_come_back_in_one_invalid_argument(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images(2)).dataset.id
    spec = lora_spec(ds, output="Not A Name", learning_rate=5.0, noise_offset=3.0)
    err = rpc_error(lambda: stack.create(spec))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err) == ["spec.output_name", H + "learning_rate", H + "noise_offset"]
    assert _no_jobs(stack)


def test_request_conversion_and_range_violations_are_reported_together(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images(2)).dataset.id
    spec = lora_spec(ds, optimizer=99, train_batch_size=1000)  # an unknown enum number, an out-of-range value
    spec.lora.rank = 100_000  # the unset alpha follows the rank: only the rank is reported
    err = rpc_error(lambda: stack.create(spec, request_id="x" * 500))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err) == ["request_id", H + "optimizer", H + "train_batch_size", "spec.lora.rank"]
    assert _no_jobs(stack)
    assert stack.create(lora_spec(ds)).created  # the server still answers, and a good spec is queued
