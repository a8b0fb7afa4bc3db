"""Workers as real `atelier worker` processes on PostgreSQL + S3: crash, takeover, races, SIGTERM.

The API runs in-process (no worker of its own); workers are subprocesses configured only
through ATELIER_* variables, exactly as in a cluster. Leases are short (3 s) so a killed
worker's job is reaped quickly; checkpoints go to the registry every 2 steps.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    stack_settings,
    wait_for,
    worker_process,
)

pytestmark = pytest.mark.slow

SUCCEEDED = training_pb2.JOB_STATE_SUCCEEDED
RUNNING = training_pb2.JOB_STATE_RUNNING
QUEUED = training_pb2.JOB_STATE_QUEUED


@pytest.fixture
def cluster(tmp_path: Path, s3_settings: Settings, postgres_url: str,
            tiny_random_pipeline_dir: Path) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, s3_settings, postgres_url, lease_seconds=3.0, heartbeat_seconds=0.5,
                              worker_poll_seconds=0.2, shutdown_grace_seconds=20.0)
    with TrainingStack(settings, workers=0) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        yield stack


BASES = {"sd1": "tiny", "sdxl": "tiny-sdxl"}


def _wait_started(log: Path, timeout: float = 90) -> None:
    wait_for(lambda: log.read_text() if log.exists() else "", lambda text: "worker started" in text, timeout, 0.2)


def _claims(stack: TrainingStack, job_id: str) -> list[str]:
    return [e.message for e in stack.store.events_after(job_id, 0) if e.message.startswith("claimed by")]


@pytest.mark.parametrize("family", list(BASES))
def test_sigkilled_worker_is_taken_over_and_resumed_from_its_checkpoint(
        cluster: TrainingStack, tmp_path: Path, family: str, request: pytest.FixtureRequest) -> None:
    stack = cluster
    if family != "sd1":
        folder = request.getfixturevalue("tiny_family_dirs")[family]
        stack.registry.base_models.import_folder(BASES[family], folder)
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds, output="crash", base=BASES[family], steps=100, checkpointing_steps=2)).job
    with worker_process(stack.settings, "worker-a", tmp_path / "a.log") as worker_a:
        stack.wait(job.id, lambda j: j.state == RUNNING and j.step >= 6, timeout=150)
        checkpoint = wait_for(lambda: stack.registry.checkpoints.latest("default", job.id),
                              lambda c: c is not None and c.step >= 2, 30)
        worker_a.send_signal(signal.SIGKILL)
        worker_a.wait(timeout=10)
    killed_at = stack.get(job.id)
    assert killed_at.state == RUNNING and killed_at.worker_id == "worker-a"
    with worker_process(stack.settings, "worker-b", tmp_path / "b.log"):
        done = stack.wait(job.id, lambda j: j.state == SUCCEEDED, timeout=180)
    assert done.attempts == 2 and done.worker_id == "worker-b"
    assert done.resumed_from_step > 0 and done.resumed_from_step >= checkpoint.step
    assert done.resumed_from_step <= killed_at.step + 2
    assert done.metrics["resumed_from_step"] == done.resumed_from_step
    versions, _ = stack.registry.adapters.list_versions("default", "crash")
    assert [(v.version, v.source_job_id, v.base_family) for v in versions] == [(1, job.id, family)]
    messages = [e.message for e in stack.store.events_after(job.id, 0)]
    assert any("lease of worker worker-a expired" in m for m in messages)
    assert _claims(stack, job.id) == ["claimed by worker-a (attempt 1)", "claimed by worker-b (attempt 2)"]
    assert any(m == f"resumed from checkpoint step {done.resumed_from_step}" for m in messages)


def test_two_workers_run_six_jobs_each_exactly_once(cluster: TrainingStack, tmp_path: Path) -> None:
    stack = cluster
    ds = stack.upload(concept_images()).dataset.id
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    with worker_process(stack.settings, "w1", logs[0]), worker_process(stack.settings, "w2", logs[1]):
        for log in logs:
            _wait_started(log)
        jobs = [stack.create(lora_spec(ds, output="shared", steps=3, seed=i)).job for i in range(6)]
        finished = [stack.wait(j.id, lambda x: x.state == SUCCEEDED, timeout=180) for j in jobs]
    assert all(j.attempts == 1 for j in finished)
    assert all(len(_claims(stack, j.id)) == 1 for j in jobs)
    assert set(Counter(j.worker_id for j in finished)) == {"w1", "w2"}
    versions, _ = stack.registry.adapters.list_versions("default", "shared")
    assert sorted(v.source_job_id for v in versions) == sorted(j.id for j in jobs)
    assert sorted(v.version for v in versions) == [1, 2, 3, 4, 5, 6]
    assert sorted(j.output.version for j in finished) == [1, 2, 3, 4, 5, 6]


def test_sigterm_checkpoints_releases_the_lease_and_another_worker_resumes(
        cluster: TrainingStack, tmp_path: Path) -> None:
    stack = cluster
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds, output="drain", steps=60, checkpointing_steps=5)).job
    with worker_process(stack.settings, "draining", tmp_path / "d.log") as worker:
        stack.wait(job.id, lambda j: j.state == RUNNING and j.step >= 3, timeout=150)
        signalled_at = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=40) == 0
        drain_seconds = time.monotonic() - signalled_at
    released = stack.get(job.id)
    assert released.state == QUEUED and released.attempts == 0, released  # a clean release costs no attempt
    checkpoint = stack.registry.checkpoints.latest("default", job.id)
    assert checkpoint is not None and checkpoint.step == released.step  # stopped right after a checkpoint
    assert drain_seconds < 30
    with worker_process(stack.settings, "successor", tmp_path / "s.log"):
        done = stack.wait(job.id, lambda j: j.state == SUCCEEDED, timeout=180)
    assert done.resumed_from_step == checkpoint.step and done.attempts == 1
    versions, _ = stack.registry.adapters.list_versions("default", "drain")
    assert len(versions) == 1
