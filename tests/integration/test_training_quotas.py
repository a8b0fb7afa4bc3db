"""Per-tenant training quotas through real gRPC with two tenants (auth on, no worker running).

Queued jobs and stored bytes refuse with RESOURCE_EXHAUSTED carrying QuotaFailure and
RetryInfo, per tenant, and the refusal stores nothing; the concurrent-jobs quota (which defers
instead of refusing) is covered on both databases by tests/unit/test_job_quotas.py and with real
workers by tests/integration/test_training_webhooks.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier_api.v1 import registry_pb2, training_pb2
from services.common.config import Settings
from tests.fixtures.grpc_servers import bearer
from tests.fixtures.s3 import write_fake_pipeline, write_lora
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    rpc_error,
    stack_settings,
    upload_messages,
)

ALICE, BOB = bearer("key-a"), bearer("key-b")


def quota_details(err: grpc.RpcError) -> tuple[list[tuple[str, str]], float]:
    """(QuotaFailure violations as (subject, description), RetryInfo seconds) of an error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {err}"
    violations: list[tuple[str, str]] = []
    retry = -1.0
    for detail in status.details:
        failure, info = error_details_pb2.QuotaFailure(), error_details_pb2.RetryInfo()
        if detail.Unpack(failure):
            violations += [(v.subject, v.description) for v in failure.violations]
        elif detail.Unpack(info):
            retry = info.retry_delay.ToTimedelta().total_seconds()
    return violations, retry


@pytest.fixture
def make_stack(tmp_path: Path, local_settings: Settings, sqlite_url: str) -> Iterator[Any]:
    stacks: list[TrainingStack] = []

    def make(**quotas: Any) -> TrainingStack:
        settings = stack_settings(tmp_path, local_settings, sqlite_url, auth_enabled=True,
                                  api_keys="key-a=alice,key-b=bob", **quotas)
        stack = TrainingStack(settings, workers=0).__enter__()
        stacks.append(stack)
        stack.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        return stack

    yield make
    for stack in stacks:
        stack.__exit__()


def upload(stack: TrainingStack, who: Any, count: int = 2) -> Any:
    return stack.training.UploadDataset(iter(upload_messages(concept_images(count), "mine", 4096)),
                                        metadata=who, timeout=30)


def create(stack: TrainingStack, who: Any, dataset_id: str, request_id: str = "") -> Any:
    request = training_pb2.CreateTrainingJobRequest(request_id=request_id, spec=lora_spec(dataset_id))
    return stack.training.CreateTrainingJob(request, metadata=who, timeout=30)


def assert_quota_refusal(err: grpc.RpcError, tenant: str, what: str) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    violations, retry = quota_details(err)
    assert [s for s, _ in violations] == [f"tenant:{tenant}"] and what in violations[0][1], violations
    assert retry > 0


def test_queued_jobs_quota_refuses_with_quota_failure_and_retry_info(make_stack: Any) -> None:
    stack = make_stack(quota_queued_jobs=2)
    ds_a, ds_b = upload(stack, ALICE).dataset.id, upload(stack, BOB).dataset.id
    first = create(stack, ALICE, ds_a, "r1").job
    create(stack, ALICE, ds_a, "r2")
    err = rpc_error(lambda: create(stack, ALICE, ds_a, "r3"))
    assert_quota_refusal(err, "alice", "queued training jobs")
    repeat = create(stack, ALICE, ds_a, "r1")  # an idempotent retry of an accepted job still answers
    assert repeat.job.id == first.id and not repeat.created
    assert create(stack, BOB, ds_b).created  # bob's quota is his own
    listed = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=ALICE).jobs
    assert len(listed) == 2  # nothing half-created
    stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=first.id), metadata=ALICE)
    assert create(stack, ALICE, ds_a, "r3").created  # room again


def test_stored_bytes_quota_refuses_uploads_and_jobs_per_tenant(make_stack: Any, tmp_path: Path) -> None:
    dataset_bytes = sum(len(data) for _, data, _ in concept_images(2))
    stack = make_stack(quota_stored_bytes=dataset_bytes)
    ds = upload(stack, ALICE).dataset  # exactly at the limit: accepted
    assert ds.total_bytes == dataset_bytes
    err = rpc_error(lambda: upload(stack, ALICE, count=1))
    assert_quota_refusal(err, "alice", "stored bytes")
    assert len(stack.training.ListDatasets(training_pb2.ListDatasetsRequest(), metadata=ALICE).datasets) == 1
    err = rpc_error(lambda: create(stack, ALICE, ds.id))  # at the limit: a job would publish more
    assert_quota_refusal(err, "alice", "stored bytes")
    bob_ds = upload(stack, BOB, count=1).dataset  # bob's bytes are counted apart
    assert create(stack, BOB, bob_ds.id).created
    # adapter versions count too: bob's published LoRA takes him over the limit
    weights = write_lora(tmp_path / "w.safetensors", dim=2048)
    stack.registry.adapters.publish("bob", "dog", kind="LORA", base_model="tiny",
                                   files={"pytorch_lora_weights.safetensors": weights})
    assert stack.registry.stored_bytes("bob") == bob_ds.total_bytes + weights.stat().st_size
    assert_quota_refusal(rpc_error(lambda: create(stack, BOB, bob_ds.id)), "bob", "stored bytes")
    # ImportAdapter (RegistryService) is an upload too: refused before anything is stored
    header = registry_pb2.ImportAdapterHeader(name="cat", base_model="tiny", filename=weights.name)
    messages = [registry_pb2.ImportAdapterRequest(header=header),
                registry_pb2.ImportAdapterRequest(chunk=weights.read_bytes())]
    err = rpc_error(lambda: stack.registry_stub.ImportAdapter(iter(messages), metadata=ALICE, timeout=30))
    assert_quota_refusal(err, "alice", "stored bytes")
    assert stack.registry.stored_bytes("alice") == dataset_bytes
