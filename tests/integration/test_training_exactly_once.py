"""The publish fence: a worker that lost its job never publishes; a publish is never repeated.

Both races are produced for real on SQLite + a local registry: the job row is handed to
another worker the way the reaper and a second claim would, and a "crashed after publish"
attempt is reproduced by publishing under the job's id and letting its lease expire.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.common.errors import AdapterNotFound
from services.registry.refs import AdapterRef
from services.training.schema import jobs
from tests.fixtures.s3 import write_lora
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    stack_settings,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def stack(tmp_path: Path, local_settings: Settings, sqlite_url: str,
          tiny_random_pipeline_dir: Path) -> Iterator[TrainingStack]:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, lease_seconds=1.0, heartbeat_seconds=0.2)
    with TrainingStack(settings, workers=1) as running:
        running.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        yield running


def test_a_worker_whose_job_was_taken_stops_and_publishes_nothing(stack: TrainingStack) -> None:
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds, output="stolen", steps=2000, checkpointing_steps=1000)).job
    stack.wait(job.id, lambda j: j.state == training_pb2.JOB_STATE_RUNNING and j.step >= 2)
    # What the reaper + another worker's claim do to the row while this worker stalls (the
    # thief's lease is long, so our own worker's reaper leaves it alone afterwards).
    with stack.store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job.id).values(
            worker_id="thief", attempts=2, lease_expires_at=jobs.c.lease_expires_at + 3600))
    worker = stack.embedded.workers[0]
    wait_for(lambda: stack.store.get_job(job.id).step, lambda _: _idle(worker), timeout=30)
    row = stack.store.get_job(job.id)
    assert row.state == "RUNNING" and row.worker_id == "thief"  # untouched by the fenced-out worker
    with pytest.raises(AdapterNotFound):
        stack.registry.adapters.resolve(AdapterRef("default", "stolen"))


def _idle(worker: object) -> bool:
    """The worker finished its attempt (its per-job work dir is gone)."""
    root: Path = worker._work_root  # type: ignore[attr-defined]
    return not root.exists() or not any(root.iterdir())


def test_a_publish_from_a_crashed_attempt_is_adopted_not_repeated(stack: TrainingStack, tmp_path: Path) -> None:
    stack.embedded.stop(timeout=10)  # drive the claim by hand, then hand over to a fresh worker
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds, output="once", steps=2)).job
    claimed = stack.store.claim("crashed-worker")
    assert claimed is not None and claimed.id == job.id
    published = stack.registry.adapters.publish(
        "default", "once", kind="LORA", base_model="tiny", source_job_id=job.id,
        files={"pytorch_lora_weights.safetensors": write_lora(tmp_path / "w.safetensors")},
    )
    # The crashed worker never recorded SUCCEEDED; its lease runs out and a new worker claims.
    from services.training.worker import Worker

    worker = Worker(stack.settings, stack.store, stack.registry, worker_id="successor")
    assert wait_for(worker.run_once, lambda ran: ran, timeout=20)
    done = stack.get(job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED and done.output.version == published.version
    assert done.attempts == 2 and done.worker_id == "successor"
    versions, _ = stack.registry.adapters.list_versions("default", "once")
    assert [v.version for v in versions] == [1]
    with stack.store.engine.begin() as conn:
        messages = conn.execute(sa.text("SELECT message FROM training_job_events WHERE job_id = :j"),
                                {"j": job.id}).scalars().all()
    assert any("adopted" in m for m in messages)


def test_a_worker_stalled_inside_its_publish_past_its_lease_adds_no_second_version(stack: TrainingStack) -> None:
    """Worker A stalls between its publish marker and its manifest; its lease expires and is
    reaped; worker B claims, retrains and publishes; then A wakes up. One version, B's."""
    import threading

    from services.registry.registry import Registry
    from services.training.worker import Worker
    from tests.integration.test_registry_exactly_once import GatedStore

    stack.embedded.stop(timeout=10)
    ds = stack.upload(concept_images()).dataset.id
    job = stack.create(lora_spec(ds, output="stall", steps=2)).job
    gated = GatedStore(stack.registry.store)
    reached, released = threading.Event(), threading.Event()

    def stall() -> None:
        reached.set()
        assert released.wait(120)

    gated.gates["stall/versions/"] = stall
    stalled = Worker(stack.settings, stack.store, Registry(gated), worker_id="stalled")  # type: ignore[arg-type]
    first = threading.Thread(target=stalled.run_once, name="stalled-worker")
    first.start()
    try:
        assert reached.wait(120), "worker A never reached its manifest write"
        # A's heartbeat keeps renewing; expire the lease and reap until the reaper takes it.
        wait_for(lambda: _expire_and_reap(stack, job.id), lambda reaped: reaped, timeout=30)
        successor = Worker(stack.settings, stack.store, stack.registry, worker_id="successor")
        assert successor.run_once()
    finally:
        released.set()
        first.join(120)
    done = stack.get(job.id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED and done.worker_id == "successor"
    versions, _ = stack.registry.adapters.list_versions("default", "stall")
    assert [v.version for v in versions] == [done.output.version]
    assert versions[0].source_job_id == job.id
    assert stack.registry.adapters.job_version("default", "stall", job.id) == versions[0]


def _expire_and_reap(stack: TrainingStack, job_id: str) -> bool:
    with stack.store.engine.begin() as conn:
        conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.state == "RUNNING")
                     .values(lease_expires_at=0.0))
    return any(reaped_id == job_id for reaped_id, _ in stack.store.reap_expired())
