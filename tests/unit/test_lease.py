"""Leases on real SQLite and PostgreSQL: heartbeat fencing, reaping, attempts, release, races."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from services.common.config import Settings
from services.training.jobstore import JobStore
from services.training.records import ValidationPreview

SPEC = {"method": "ADAPTER_KIND_LORA", "baseModel": "tiny", "datasetId": "ds-1", "outputName": "dog"}
LEASE = 0.6


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    s = JobStore.open(Settings(database_url=database_url, lease_seconds=LEASE, max_job_attempts=2))
    yield s
    s.close()


def _queue(store: JobStore) -> str:
    return store.create_job("t1", "", method="LORA", spec=SPEC, output_name="dog", total_steps=10)[0].id


def _claim(store: JobStore, worker: str) -> str:
    job = store.claim(worker)
    assert job is not None
    return job.id


def test_only_the_owner_heartbeats_and_writes(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    before = store.get_job(job_id).lease_expires_at
    time.sleep(0.05)
    assert store.heartbeat(job_id, "w1").owned
    after = store.get_job(job_id).lease_expires_at
    assert before is not None and after is not None and after > before
    assert not store.heartbeat(job_id, "w2").owned
    assert not store.record_progress(job_id, "w2", step=3, loss=0.1, learning_rate=1e-4,
                                     eta_seconds=1.0, emit_event=True).owned
    status = store.record_progress(job_id, "w1", step=3, loss=0.1, learning_rate=1e-4,
                                   eta_seconds=1.0, emit_event=True)
    assert status.owned and not status.cancel_requested
    job = store.get_job(job_id)
    assert (job.step, job.loss, job.learning_rate) == (3, 0.1, 1e-4)
    assert store.record_validation(job_id, "w1", [ValidationPreview(3, "a dog", b"\x89PNG")]).owned
    last = store.events_after(job_id, 0)[-1]
    assert last.kind == "validation" and last.previews[0].png == b"\x89PNG"
    assert store.get_job(job_id).metrics == {}  # no loss reported: metrics untouched
    assert store.record_validation(job_id, "w1", [ValidationPreview(6, "a dog", b"\x89PNG")], loss=0.25).owned
    assert store.get_job(job_id).metrics == {"validation_loss": 0.25, "validation_step": 6.0}
    assert not store.record_validation(job_id, "w2", [], loss=9.0).owned
    assert store.get_job(job_id).metrics["validation_loss"] == 0.25


def test_expired_lease_requeues_and_fences_the_old_worker(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    assert store.reap_expired() == []  # lease still valid
    time.sleep(LEASE + 0.2)
    assert store.reap_expired() == [(job_id, "QUEUED")]
    requeued = store.get_job(job_id)
    assert requeued.state == "QUEUED" and requeued.worker_id is None
    assert "expired" in requeued.error
    assert _claim(store, "w2") == job_id
    assert store.get_job(job_id).attempts == 2
    # The old worker wakes up: every fenced write fails, it cannot publish or finish.
    assert not store.heartbeat(job_id, "w1").owned
    assert not store.prepare_publish(job_id, "w1").owned
    assert not store.complete(job_id, "w1", output_version=1, metrics={}, message="x")
    assert not store.finish_cancelled(job_id, "w1")
    assert store.fail(job_id, "w1", "boom", retryable=True) is None
    assert store.complete(job_id, "w2", output_version=1, metrics={"loss": 0.5}, message="published")
    done = store.get_job(job_id)
    assert done.state == "SUCCEEDED" and done.output_version == 1 and done.metrics == {"loss": 0.5}
    assert store.events_after(job_id, 0)[-1].published == ("dog", 1)


def test_after_max_attempts_the_job_fails_with_the_last_error(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    assert store.fail(job_id, "w1", "CUDA out of memory", retryable=True) == "QUEUED"
    _claim(store, "w2")
    time.sleep(LEASE + 0.2)
    assert store.reap_expired() == [(job_id, "FAILED")]
    failed = store.get_job(job_id)
    assert failed.state == "FAILED" and failed.attempts == 2 and failed.finished_at is not None
    assert "expired" in failed.error and "CUDA out of memory" in failed.error
    assert store.claim("w3") is None


def test_permanent_errors_fail_at_once(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    assert store.fail(job_id, "w1", "bad config", retryable=False) == "FAILED"
    assert store.get_job(job_id).error == "bad config"


def test_cancel_of_a_running_job_is_seen_by_its_worker(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    assert store.cancel_job(job_id, "t1").state == "RUNNING"
    assert store.heartbeat(job_id, "w1").cancel_requested
    assert store.record_progress(job_id, "w1", step=1, loss=None, learning_rate=None,
                                 eta_seconds=None, emit_event=False).cancel_requested
    assert store.finish_cancelled(job_id, "w1")
    assert store.get_job(job_id).state == "CANCELLED"


def test_a_cancelled_job_whose_worker_died_ends_cancelled(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    store.cancel_job(job_id, "t1")
    time.sleep(LEASE + 0.2)
    assert store.reap_expired() == [(job_id, "CANCELLED")]


def test_graceful_release_does_not_use_up_an_attempt(store: JobStore) -> None:
    job_id = _queue(store)
    _claim(store, "w1")
    assert store.release(job_id, "w1", "SIGTERM")
    job = store.get_job(job_id)
    assert job.state == "QUEUED" and job.attempts == 0 and job.worker_id is None
    assert not store.release(job_id, "w1", "again")


def test_racing_workers_claim_each_job_exactly_once(store: JobStore) -> None:
    ids = {_queue(store) for _ in range(12)}
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()

    def work(worker: str) -> None:
        while (job := store.claim(worker)) is not None:
            with lock:
                claims.append((job.id, worker))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = Counter(job_id for job_id, _ in claims)
    assert set(counts) == ids and set(counts.values()) == {1}
