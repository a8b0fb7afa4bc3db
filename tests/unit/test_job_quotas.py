"""Per-tenant job quotas in the job store, on real SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from services.common.config import Settings
from services.common.errors import QuotaExceeded
from services.training.jobstore import JobStore

SPEC = {"method": "ADAPTER_KIND_LORA", "baseModel": "tiny", "datasetId": "ds-1", "outputName": "dog"}


def open_store(database_url: str, **quotas: int) -> JobStore:
    return JobStore.open(Settings(database_url=database_url, lease_seconds=30, max_job_attempts=2, **quotas))


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    s = open_store(database_url, quota_concurrent_jobs=1, quota_queued_jobs=3)
    yield s
    s.close()


def create(store: JobStore, tenant: str, request_id: str = "") -> str:
    job, _ = store.create_job(tenant, request_id, method="LORA", spec=SPEC, output_name="dog", total_steps=5)
    return job.id


def test_claim_skips_tenants_at_their_concurrent_limit_and_they_wait(store: JobStore) -> None:
    a1, a2 = create(store, "alice"), create(store, "alice")
    b1 = create(store, "bob")
    first = store.claim("w1")
    second = store.claim("w2")
    assert first is not None and second is not None
    assert (first.id, second.id) == (a1, b1)  # a2 is older than b1 but alice already runs one
    assert store.claim("w3") is None
    assert store.get_job(a2).state == "QUEUED"  # waiting, not dropped
    assert store.complete(a1, "w1", output_version=1, metrics={}, message="done")
    third = store.claim("w3")
    assert third is not None and third.id == a2


def test_queued_quota_refuses_new_jobs_but_not_repeats(store: JobStore) -> None:
    ids = [create(store, "alice", f"r{i}") for i in range(3)]
    with pytest.raises(QuotaExceeded) as info:
        create(store, "alice", "r3")
    assert info.value.violations[0].subject == "tenant:alice" and info.value.retry_after_seconds > 0
    assert create(store, "alice", "r0") == ids[0]  # an idempotent repeat still answers
    create(store, "bob")  # per tenant
    store.cancel_job(ids[1], "alice")
    create(store, "alice", "r3")  # room again


def test_concurrent_creates_never_exceed_the_queued_quota(database_url: str) -> None:
    store = open_store(database_url, quota_queued_jobs=3)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def one(i: int) -> None:
        barrier.wait()
        try:
            create(store, "alice", f"c{i}")
            outcomes.append("created")
        except QuotaExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert sorted(outcomes) == ["created"] * 3 + ["refused"] * 5
    finally:
        store.close()


def test_concurrent_claims_never_exceed_the_concurrent_quota(database_url: str) -> None:
    store = open_store(database_url, quota_concurrent_jobs=2)
    for _ in range(6):
        create(store, "alice")
    barrier = threading.Barrier(6)
    claimed: list[str] = []

    def one(i: int) -> None:
        barrier.wait()
        job = store.claim(f"w{i}")
        if job is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert len(claimed) == 2 and store.counts_by_state() == {"RUNNING": 2, "QUEUED": 4}
    finally:
        store.close()
