"""The training job queue and state machine in SQL (SQLite embedded, PostgreSQL in cluster).

States: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING -> QUEUED when a
lease expires (or a worker shuts down gracefully or fails with a retryable error).

This module holds the API side (create, read, list, cancel, events, queue metrics); the
worker side (claim, heartbeat, progress, complete/fail/release, reaping), every write of
which is fenced by lease ownership, lives in `services/training/leases.py` and is mixed in.

Each transition also appends to the job's event log, which WatchTrainingJob replays.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from services.common.config import Settings
from services.common.errors import AlreadyExists, NotFound, QuotaExceeded
from services.registry.documents import checked_page_size
from services.training.db import create_db_engine, migrate
from services.training.leases import LeaseOps, append_event, count_in_state, lock_tenant
from services.training.quotas import QUEUED_RETRY_SECONDS
from services.training.records import JobEvent, JobRecord, decode_page_token, encode_page_token
from services.training.schema import epoch_now, events, jobs
from services.training.sql import QUEUED_JOBS_COUNT_SQL

MAX_PAGE_SIZE = 500  # jobs per page at most (the default, 50, is the registry's too)


def _new_job_id() -> str:
    """Time-ordered ids (like UUIDv7): they break created_at ties in creation order, which
    matters on SQLite, whose clock has millisecond resolution."""
    return f"job-{time.time_ns():016x}{uuid.uuid4().hex[:12]}"


class JobStore(LeaseOps):
    """All job-table reads and writes; synchronous, thread-safe (one engine, pooled)."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float,
        max_attempts: int,
        id_factory: Callable[[], str] = _new_job_id,
        max_queued_per_tenant: int = 0,
        max_running_per_tenant: int = 0,
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.max_attempts = max(1, max_attempts)
        self._new_id = id_factory
        self.max_queued_per_tenant = max(0, max_queued_per_tenant)  # 0 = unlimited (quotas.py)
        self.max_running_per_tenant = max(0, max_running_per_tenant)

    @classmethod
    def open(cls, settings: Settings) -> JobStore:
        """Connect to `settings.database_url` and migrate the schema to head."""
        engine = create_db_engine(settings.database_url)
        migrate(engine)
        return cls(engine, lease_seconds=settings.lease_seconds, max_attempts=settings.max_job_attempts,
                   max_queued_per_tenant=settings.quota_queued_jobs,
                   max_running_per_tenant=settings.quota_concurrent_jobs)

    def close(self) -> None:
        self.engine.dispose()

    # --- API side -----------------------------------------------------------------------
    def create_job(
        self,
        tenant: str,
        request_id: str,
        *,
        method: str,
        spec: dict[str, Any],
        output_name: str,
        total_steps: int,
        config: dict[str, Any] | None = None,
        webhook: tuple[str, str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job, or return the job an earlier call with `request_id` created.

        Returns (job, created). A reused request_id with a different spec is a client bug
        and raises AlreadyExists rather than silently returning an unrelated job. A new job
        over the tenant's queued-jobs quota raises QuotaExceeded (a repeat still returns).
        """
        request_id = request_id or f"auto-{uuid.uuid4().hex}"
        for _ in range(3):
            existing = self._find_request(tenant, request_id)
            if existing is not None:
                if existing.spec != spec:
                    raise AlreadyExists(
                        "training job request",
                        request_id,
                        f"request_id {request_id!r} was already used by job {existing.id} "
                        "with a different spec",
                    )
                return existing, False
            try:
                return self._insert(tenant, request_id, method, spec, output_name, total_steps, config,
                                    webhook), True
            except IntegrityError:
                continue  # a concurrent create with the same request_id won; read it
        raise AlreadyExists("training job request", request_id)

    def _find_request(self, tenant: str, request_id: str) -> JobRecord | None:
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs).where(jobs.c.tenant == tenant, jobs.c.request_id == request_id)
            ).first()
        return JobRecord.from_row(row._mapping) if row else None

    def _insert(
        self, tenant: str, request_id: str, method: str, spec: dict[str, Any], output_name: str, total: int,
        config: dict[str, Any] | None, webhook: tuple[str, str] | None = None,
    ) -> JobRecord:
        job_id = self._new_id()
        url, secret = webhook or (None, None)
        with self.engine.begin() as conn:
            self._check_queued_quota(conn, tenant)
            row = conn.execute(
                jobs.insert()
                .values(
                    id=job_id, tenant=tenant, request_id=request_id, method=method, state="QUEUED",
                    spec=spec, config=config, step=0, total_steps=total, attempts=0, error="", cancel_requested=False,
                    output_name=output_name, resumed_from_step=0, metrics={},
                    created_at=epoch_now(), updated_at=epoch_now(), webhook_url=url, webhook_secret=secret,
                )
                .returning(*jobs.c)
            ).one()
            append_event(conn, job_id, "state", "QUEUED", "job created")
        return JobRecord.from_row(row._mapping)

    def _check_queued_quota(self, conn: Connection, tenant: str) -> None:
        limit = self.max_queued_per_tenant
        if limit <= 0:
            return
        lock_tenant(conn, tenant)
        queued = count_in_state(conn, tenant, "QUEUED")
        if queued >= limit:
            raise QuotaExceeded(tenant, f"queued training jobs: {queued} of a limit of {limit}; "
                                "retry when some have started", QUEUED_RETRY_SECONDS)

    def get_job(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The job; NotFound when it does not exist in `tenant` (None: any tenant)."""
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        with self.engine.begin() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound("training job", job_id)
        return JobRecord.from_row(row._mapping)

    def list_jobs(
        self,
        tenant: str,
        page_size: int = 0,
        page_token: str = "",
        state: str | None = None,
        method: str | None = None,
    ) -> tuple[list[JobRecord], str]:
        """Newest first, keyset-paginated on (created_at, id); next token "" at the end."""
        size = checked_page_size(page_size, maximum=MAX_PAGE_SIZE)
        query = sa.select(jobs).where(jobs.c.tenant == tenant)
        if state:
            query = query.where(jobs.c.state == state)
        if method:
            query = query.where(jobs.c.method == method)
        if page_token:
            created, last_id = decode_page_token(page_token)
            query = query.where(
                sa.or_(
                    jobs.c.created_at < created,
                    sa.and_(jobs.c.created_at == created, jobs.c.id < last_id),
                )
            )
        query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(size + 1)
        with self.engine.begin() as conn:
            records = [JobRecord.from_row(r._mapping) for r in conn.execute(query)]
        if len(records) <= size:
            return records, ""
        last = records[size - 1]
        return records[:size], encode_page_token(last.created_at, last.id)

    def cancel_job(self, job_id: str, tenant: str) -> JobRecord:
        """QUEUED -> CANCELLED at once; RUNNING -> flagged, its worker stops within a step.

        Cancelling a finished job changes nothing and returns it (cancel is best effort).
        """
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.state, jobs.c.step)
                .where(jobs.c.id == job_id, jobs.c.tenant == tenant)
                .with_for_update()
            ).first()
            if row is None:
                raise NotFound("training job", job_id)
            if row.state == "QUEUED":
                conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state == "QUEUED")
                    .values(state="CANCELLED", cancel_requested=True, finished_at=epoch_now(),
                            updated_at=epoch_now())
                )
                append_event(conn, job_id, "state", "CANCELLED", "cancelled while queued")
            elif row.state == "RUNNING":
                conn.execute(
                    jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True, updated_at=epoch_now())
                )
                append_event(conn, job_id, "state", "RUNNING", "cancel requested", step=row.step)
        return self.get_job(job_id, tenant)

    def events_after(self, job_id: str, after_id: int, limit: int = 200) -> list[JobEvent]:
        """Events of a job with id > after_id, oldest first."""
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(events)
                .where(events.c.job_id == job_id, events.c.id > after_id)
                .order_by(events.c.id)
                .limit(limit)
            )
            return [JobEvent.from_row(r._mapping) for r in rows]

    def last_event_id(self, job_id: str) -> int:
        with self.engine.begin() as conn:
            value = conn.execute(sa.select(sa.func.max(events.c.id)).where(events.c.job_id == job_id)).scalar()
        return int(value or 0)

    def queue_depth(self) -> int:
        """Jobs waiting for a worker: the exact statement the KEDA trigger runs."""
        with self.engine.begin() as conn:
            return int(conn.execute(sa.text(QUEUED_JOBS_COUNT_SQL)).scalar() or 0)

    def counts_by_state(self) -> dict[str, int]:
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state))
            return {str(state): int(count) for state, count in rows}

