"""Job webhooks end to end: gRPC create with a webhook, real job-store transitions, a loopback
HTTP receiver, and the dispatcher that TrainingRuntime runs.

Terminal states are produced through the job store's own worker API (claim/complete/fail) and
CancelTrainingJob, so no training runs here; the worker calls exactly these methods.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.training import webhook_outbox as outbox
from services.training.webhooks import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, WebhookDispatcher, verify
from tests.fixtures.grpc_servers import bearer
from tests.fixtures.s3 import write_fake_pipeline
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    rpc_error,
    stack_settings,
    upload_messages,
    violation_fields,
    wait_for,
)

SECRET = "s3cret-s3cret-s3cret"


@dataclass
class Receiver:
    """A loopback HTTP endpoint answering 500 to the first `failures` POSTs of each key."""

    failures: int
    calls: list[dict[str, Any]] = field(default_factory=list)
    server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/atelier"

    def for_key(self, key: str) -> list[dict[str, Any]]:
        return [c for c in list(self.calls) if c["key"] == key]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(failures=2)
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            key = self.headers[IDEMPOTENCY_HEADER]
            with lock:
                seen = len(state.for_key(key))
                state.calls.append({"key": key, "signature": self.headers[SIGNATURE_HEADER], "body": body,
                                    "path": self.path, "type": self.headers["Content-Type"]})
            self.send_response(500 if seen < state.failures else 204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    state.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.server.shutdown()
    state.server.server_close()


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, webhook_backoff_seconds=0.05,
                              webhook_poll_seconds=0.05, webhook_timeout_seconds=5.0, webhook_max_attempts=4)
    with TrainingStack(settings, workers=0) as running:
        running.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        yield running


def create(stack: TrainingStack, dataset_id: str, url: str, secret: str = SECRET) -> training_pb2.TrainingJob:
    request = training_pb2.CreateTrainingJobRequest(spec=lora_spec(dataset_id), webhook_url=url,
                                                    webhook_secret=secret)
    return stack.training.CreateTrainingJob(request, timeout=30).job


def delivered(stack: TrainingStack, job_id: str) -> list[dict[str, Any]]:
    return wait_for(lambda: outbox.deliveries_of(stack.store.engine, job_id),
                    lambda rows: bool(rows) and all(r["status"] != "PENDING" for r in rows), timeout=30)


def test_each_terminal_state_is_delivered_signed_and_retried_with_one_key(stack: TrainingStack,
                                                                         receiver: Receiver) -> None:
    ds = stack.upload(concept_images(2)).dataset.id
    jobs = {state: create(stack, ds, receiver.url) for state in ("SUCCEEDED", "FAILED", "CANCELLED")}
    assert jobs["SUCCEEDED"].webhook_url == receiver.url
    stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=jobs["CANCELLED"].id))
    for _ in range(2):
        job = stack.store.claim("w1")
        assert job is not None
        if job.id == jobs["SUCCEEDED"].id:
            assert stack.store.complete(job.id, "w1", output_version=3, metrics={"loss": 0.5}, message="done")
        else:
            assert stack.store.fail(job.id, "w1", "bad input", retryable=False) == "FAILED"
    for state, job in jobs.items():
        key = f"{job.id}:{state}"
        rows = delivered(stack, job.id)
        assert [(r["idempotency_key"], r["status"], r["attempts"]) for r in rows] == [(key, "DELIVERED", 3)]
        calls = receiver.for_key(key)
        assert len(calls) == 3  # 500, 500, then accepted
        assert len({c["body"] for c in calls}) == 1  # the very same bytes on every attempt
        for call in calls:
            assert verify(SECRET, call["signature"], call["body"])
            assert not verify("another-secret-entirely", call["signature"], call["body"])
            assert call["path"] == "/hooks/atelier" and call["type"] == "application/json"
        body = json.loads(calls[0]["body"])
        assert body["type"] == f"training_job.{state.lower()}" and body["idempotency_key"] == key
        assert body["job"]["id"] == job.id and body["job"]["state"] == state
    assert json.loads(receiver.for_key(f"{jobs['SUCCEEDED'].id}:SUCCEEDED")[0]["body"])["job"]["output_version"] == 3
    assert json.loads(receiver.for_key(f"{jobs['FAILED'].id}:FAILED")[0]["body"])["job"]["error"] == "bad input"
    tampered = receiver.calls[0]
    assert not verify(SECRET, tampered["signature"], tampered["body"] + b" ")


def test_a_delivery_survives_a_crash_after_the_state_change(tmp_path: Path, local_settings: Settings,
                                                           sqlite_url: str, receiver: Receiver) -> None:
    receiver.failures = 0
    settings = stack_settings(tmp_path, local_settings, sqlite_url, webhook_poll_seconds=3600.0)
    with TrainingStack(settings, workers=0) as stack:  # its dispatcher sleeps: nothing is sent
        stack.registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "fake-sd"))
        job = create(stack, stack.upload(concept_images(2)).dataset.id, receiver.url)
        stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job.id))
        engine = stack.store.engine
        [row] = outbox.deliveries_of(engine, job.id)  # written with the state change
        assert row["status"] == "PENDING"
        # a dispatcher claims it and dies before sending (its in-flight lease runs out at once)
        assert len(outbox.claim_due(engine, 10, -outbox.CLAIM_MARGIN_SECONDS)) == 1
        assert WebhookDispatcher(settings, engine).run_once() == 1  # another process sends it
        assert [c["key"] for c in receiver.calls] == [f"{job.id}:CANCELLED"]
        assert outbox.deliveries_of(engine, job.id)[0]["status"] == "DELIVERED"


def test_delivery_gives_up_after_max_attempts_and_keeps_the_error(stack: TrainingStack,
                                                                 receiver: Receiver) -> None:
    receiver.failures = 100
    job = create(stack, stack.upload(concept_images(2)).dataset.id, receiver.url)
    stack.training.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job.id))
    [row] = delivered(stack, job.id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("GAVE_UP", 4, "HTTP 500")
    assert len(receiver.calls) == 4


@pytest.mark.parametrize(("url", "secret", "field_name"), [
    ("ftp://127.0.0.1/x", SECRET, "webhook_url"),
    ("not a url", SECRET, "webhook_url"),
    ("http://" + "a" * 2048, SECRET, "webhook_url"),
    ("https://example.test/hook", "", "webhook_secret"),
    ("https://example.test/hook", "short", "webhook_secret"),
    ("", SECRET, "webhook_secret"),
])
def test_bad_webhooks_are_refused_naming_the_field(stack: TrainingStack, url: str, secret: str,
                                                   field_name: str) -> None:
    ds = stack.upload(concept_images(2)).dataset.id
    err = rpc_error(lambda: create(stack, ds, url, secret))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation_fields(err) == [field_name]
    assert stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest()).jobs == []


def test_real_workers_honour_the_concurrent_quota_and_deliver_success(
        tmp_path: Path, local_settings: Settings, sqlite_url: str, tiny_random_pipeline_dir: Path,
        receiver: Receiver) -> None:
    """Two in-process workers, quota_concurrent_jobs=1: alice's second job waits while bob's
    runs, nothing is dropped, and alice's SUCCEEDED webhooks arrive (after 2 failures each)."""
    settings = stack_settings(tmp_path, local_settings, sqlite_url, auth_enabled=True,
                              api_keys="key-a=alice,key-b=bob", quota_concurrent_jobs=1,
                              webhook_backoff_seconds=0.05, webhook_poll_seconds=0.05)
    alice, bob = bearer("key-a"), bearer("key-b")
    with TrainingStack(settings, workers=2) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)

        def start(who: Any, url: str = "") -> str:
            ds = stack.training.UploadDataset(iter(upload_messages(concept_images(2), "d", 4096)),
                                              metadata=who, timeout=30).dataset.id
            request = training_pb2.CreateTrainingJobRequest(spec=lora_spec(ds, steps=3), webhook_url=url,
                                                            webhook_secret=SECRET if url else "")
            return stack.training.CreateTrainingJob(request, metadata=who, timeout=30).job.id

        a1, a2 = start(alice, receiver.url), start(alice, receiver.url)
        b1 = start(bob)
        most_running = 0
        jobs: dict[str, training_pb2.TrainingJob] = {}
        while len(jobs) < 3 or any(j.state != training_pb2.JOB_STATE_SUCCEEDED for j in jobs.values()):
            for who in (alice, bob):
                listed = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=who,
                                                         timeout=10).jobs
                jobs.update({j.id: j for j in listed})
            most_running = max(most_running, sum(1 for j in jobs.values() if j.id in (a1, a2)
                                                 and j.state == training_pb2.JOB_STATE_RUNNING))
            assert not any(j.state == training_pb2.JOB_STATE_FAILED for j in jobs.values()), jobs
            time.sleep(0.05)
        assert most_running == 1
        assert jobs[b1].started_at.ToNanoseconds() < jobs[a2].started_at.ToNanoseconds()  # bob did not wait
        assert jobs[a2].started_at.ToNanoseconds() >= jobs[a1].finished_at.ToNanoseconds()
        for job_id in (a1, a2):
            rows = delivered(stack, job_id)
            assert [(r["status"], r["attempts"]) for r in rows] == [("DELIVERED", 3)]
            body = json.loads(receiver.for_key(f"{job_id}:SUCCEEDED")[-1]["body"])
            assert body["job"]["output_version"] == jobs[job_id].output.version
        assert outbox.deliveries_of(stack.store.engine, b1) == []  # no webhook, no delivery
