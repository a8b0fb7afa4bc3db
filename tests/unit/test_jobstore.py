"""Job store on real SQLite and PostgreSQL: schema, idempotent create, listing, cancel, queue."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from services.common.config import Settings
from services.common.errors import AlreadyExists, InvalidInput, NotFound
from services.training.db import create_db_engine, current_revision, migrate
from services.training.jobstore import JobStore
from services.training.schema import metadata
from services.training.sql import JOBS_TABLE, QUEUED_JOBS_COUNT_SQL

SPEC = {"method": "ADAPTER_KIND_LORA", "baseModel": "tiny", "datasetId": "ds-1", "outputName": "dog"}


@pytest.fixture
def store(database_url: str) -> Iterator[JobStore]:
    s = JobStore.open(Settings(database_url=database_url, lease_seconds=5, max_job_attempts=2))
    yield s
    s.close()


def _create(store: JobStore, request_id: str = "", tenant: str = "t1", **spec: str) -> str:
    job, created = store.create_job(
        tenant, request_id, method="LORA", spec={**SPEC, **spec}, output_name="dog", total_steps=10
    )
    assert created
    return job.id


def test_migrations_build_exactly_the_live_schema(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent: a second process starting up changes nothing
        assert current_revision(engine) == "0003"
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diffs == []
        with engine.begin() as conn:
            assert conn.execute(sa.text(QUEUED_JOBS_COUNT_SQL)).scalar() == 0
    finally:
        engine.dispose()


def test_concurrent_startup_migrations_do_not_race(postgres_url: str) -> None:
    engines = [create_db_engine(postgres_url) for _ in range(3)]
    errors: list[BaseException] = []

    def run(engine: sa.Engine) -> None:
        try:
            migrate(engine)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    assert errors == []


def test_create_is_idempotent_on_request_id(store: JobStore) -> None:
    first, created = store.create_job("t1", "req-1", method="LORA", spec=SPEC, output_name="dog", total_steps=10)
    again, created_again = store.create_job(
        "t1", "req-1", method="LORA", spec=SPEC, output_name="dog", total_steps=10
    )
    assert created and not created_again
    assert again.id == first.id and again.state == "QUEUED"
    other_tenant, created_other = store.create_job(
        "t2", "req-1", method="LORA", spec=SPEC, output_name="dog", total_steps=10
    )
    assert created_other and other_tenant.id != first.id
    with pytest.raises(AlreadyExists):
        store.create_job("t1", "req-1", method="LORA", spec={**SPEC, "datasetId": "x"},
                         output_name="dog", total_steps=10)
    # No request id: every call creates a job.
    assert _create(store) != _create(store)
    assert store.queue_depth() == 4


def test_concurrent_creates_with_one_request_id_make_one_job(store: JobStore) -> None:
    ids: list[str] = []

    def create() -> None:
        job, _ = store.create_job("t1", "same", method="LORA", spec=SPEC, output_name="dog", total_steps=1)
        ids.append(job.id)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1


def test_jobs_are_tenant_scoped(store: JobStore) -> None:
    job_id = _create(store)
    assert store.get_job(job_id, "t1").id == job_id
    with pytest.raises(NotFound):
        store.get_job(job_id, "t2")
    with pytest.raises(NotFound):
        store.cancel_job(job_id, "t2")
    assert store.list_jobs("t2") == ([], "")


def test_list_paginates_newest_first_and_filters(store: JobStore) -> None:
    ids = [_create(store) for _ in range(5)]
    ti = store.create_job("t1", "", method="TEXTUAL_INVERSION", spec=SPEC, output_name="x", total_steps=1)[0]
    store.cancel_job(ids[0], "t1")
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_jobs("t1", page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [j.id for j in page]
        if not token:
            break
    assert seen == [ti.id, *reversed(ids)]
    assert [j.id for j in store.list_jobs("t1", method="TEXTUAL_INVERSION")[0]] == [ti.id]
    assert [j.id for j in store.list_jobs("t1", state="CANCELLED")[0]] == [ids[0]]
    with pytest.raises(InvalidInput) as err:
        store.list_jobs("t1", page_token="garbage!")
    assert err.value.violations[0].field == "page_token"


def test_cancel_queued_job_is_immediate_and_never_claimed(store: JobStore) -> None:
    job_id = _create(store)
    cancelled = store.cancel_job(job_id, "t1")
    assert cancelled.state == "CANCELLED" and cancelled.finished_at is not None
    assert store.claim("w1") is None
    assert store.cancel_job(job_id, "t1").state == "CANCELLED"  # idempotent
    kinds = [(e.kind, e.state) for e in store.events_after(job_id, 0)]
    assert kinds == [("state", "QUEUED"), ("state", "CANCELLED")]


def test_claim_is_fifo_and_counts_attempts(store: JobStore) -> None:
    first, second = _create(store), _create(store)
    claimed = store.claim("w1")
    assert claimed is not None and claimed.id == first
    assert claimed.state == "RUNNING" and claimed.worker_id == "w1" and claimed.attempts == 1
    assert claimed.lease_expires_at is not None and claimed.started_at is not None
    nxt = store.claim("w2")
    assert nxt is not None and nxt.id == second
    assert store.claim("w3") is None
    assert store.counts_by_state() == {"RUNNING": 2}
    assert store.queue_depth() == 0


def test_jobs_table_name_is_the_shared_constant(store: JobStore) -> None:
    with store.engine.connect() as conn:
        assert sa.inspect(conn).has_table(JOBS_TABLE)
