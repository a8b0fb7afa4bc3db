"""The training job queue and state machine in SQL (SQLite embedded, PostgreSQL in cluster).

States: QUEUED -> RUNNING -> SUCCEEDED | FAILED | CANCELLED, and RUNNING -> QUEUED when a
lease expires (or a worker shuts down gracefully or fails with a retryable error).

Every worker-side write is *fenced* by ownership: it only touches the row while
`state = 'RUNNING' AND worker_id = <me>`. A worker whose lease was reaped and whose job
was claimed by another worker therefore finds its writes hitting zero rows, learns it lost
the job (`LeaseStatus.owned == False`) and stops without publishing. Times come from the
database clock (`epoch_now`), so all lease arithmetic uses one clock.

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
from services.common.errors import AlreadyExists, NotFound
from services.training.db import create_db_engine, migrate
from services.training.records import (
    JobEvent,
    JobRecord,
    LeaseStatus,
    ValidationPreview,
    decode_page_token,
    encode_page_token,
    previews_payload,
)
from services.training.schema import epoch_now, events, jobs
from services.training.sql import QUEUED_JOBS_COUNT_SQL

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def _new_job_id() -> str:
    """Time-ordered ids (like UUIDv7): they break created_at ties in creation order, which
    matters on SQLite, whose clock has millisecond resolution."""
    return f"job-{time.time_ns():016x}{uuid.uuid4().hex[:12]}"


class JobStore:
    """All job-table reads and writes; synchronous, thread-safe (one engine, pooled)."""

    def __init__(
        self,
        engine: Engine,
        *,
        lease_seconds: float,
        max_attempts: int,
        id_factory: Callable[[], str] = _new_job_id,
    ) -> None:
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.max_attempts = max(1, max_attempts)
        self._new_id = id_factory

    @classmethod
    def open(cls, settings: Settings) -> JobStore:
        """Connect to `settings.database_url` and migrate the schema to head."""
        engine = create_db_engine(settings.database_url)
        migrate(engine)
        return cls(engine, lease_seconds=settings.lease_seconds, max_attempts=settings.max_job_attempts)

    def close(self) -> None:
        self.engine.dispose()

    # --- helpers ----------------------------------------------------------------------
    @staticmethod
    def _event(conn: Connection, job_id: str, kind: str, state: str, message: str = "", **values: Any) -> None:
        conn.execute(
            events.insert().values(
                job_id=job_id, created_at=epoch_now(), kind=kind, state=state, message=message, **values
            )
        )

    @staticmethod
    def _owned(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.state == "RUNNING")

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
    ) -> tuple[JobRecord, bool]:
        """Insert a QUEUED job, or return the job an earlier call with `request_id` created.

        Returns (job, created). A reused request_id with a different spec is a client bug
        and raises AlreadyExists rather than silently returning an unrelated job.
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
                return self._insert(tenant, request_id, method, spec, output_name, total_steps, config), True
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
        config: dict[str, Any] | None,
    ) -> JobRecord:
        job_id = self._new_id()
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.insert()
                .values(
                    id=job_id, tenant=tenant, request_id=request_id, method=method, state="QUEUED",
                    spec=spec, config=config, step=0, total_steps=total, attempts=0, error="", cancel_requested=False,
                    output_name=output_name, resumed_from_step=0, metrics={},
                    created_at=epoch_now(), updated_at=epoch_now(),
                )
                .returning(*jobs.c)
            ).one()
            self._event(conn, job_id, "state", "QUEUED", "job created")
        return JobRecord.from_row(row._mapping)

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
        size = DEFAULT_PAGE_SIZE if page_size <= 0 else min(page_size, MAX_PAGE_SIZE)
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
                sa.select(jobs.c.state).where(jobs.c.id == job_id, jobs.c.tenant == tenant).with_for_update()
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
                self._event(conn, job_id, "state", "CANCELLED", "cancelled while queued")
            elif row.state == "RUNNING":
                conn.execute(
                    jobs.update().where(jobs.c.id == job_id).values(cancel_requested=True, updated_at=epoch_now())
                )
                self._event(conn, job_id, "state", "RUNNING", "cancel requested")
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

    # --- worker side --------------------------------------------------------------------
    def claim(self, worker_id: str) -> JobRecord | None:
        """Take the oldest QUEUED job and lease it to `worker_id` (FOR UPDATE SKIP LOCKED)."""
        with self.engine.begin() as conn:
            picked = conn.execute(
                sa.select(jobs.c.id)
                .where(jobs.c.state == "QUEUED")
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if picked is None:
                return None
            row = conn.execute(
                jobs.update()
                .where(jobs.c.id == picked.id, jobs.c.state == "QUEUED")
                .values(
                    state="RUNNING", worker_id=worker_id, attempts=jobs.c.attempts + 1,
                    lease_expires_at=epoch_now() + self.lease_seconds,
                    started_at=sa.func.coalesce(jobs.c.started_at, epoch_now()),
                    updated_at=epoch_now(), eta_seconds=None,
                )
                .returning(*jobs.c)
            ).one()
            record = JobRecord.from_row(row._mapping)
            self._event(conn, record.id, "state", "RUNNING",
                        f"claimed by {worker_id} (attempt {record.attempts})", step=record.step)
        return record

    def heartbeat(self, job_id: str, worker_id: str) -> LeaseStatus:
        """Renew the lease if `worker_id` still owns the job."""
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(self._owned(job_id, worker_id))
                .values(lease_expires_at=epoch_now() + self.lease_seconds, updated_at=epoch_now())
                .returning(jobs.c.cancel_requested)
            ).first()
        return LeaseStatus(False) if row is None else LeaseStatus(True, bool(row.cancel_requested))

    def start_attempt(
        self, job_id: str, worker_id: str, *, resumed_from_step: int, total_steps: int, config: dict[str, Any]
    ) -> LeaseStatus:
        """Record the resolved config and where this attempt starts (0 or a checkpoint step)."""
        message = f"resumed from checkpoint step {resumed_from_step}" if resumed_from_step else "training"
        return self._owned_update(
            job_id, worker_id,
            {"resumed_from_step": resumed_from_step, "step": resumed_from_step,
             "total_steps": total_steps, "config": config},
            event=("state", message, {"step": resumed_from_step}),
        )

    def record_progress(
        self, job_id: str, worker_id: str, *, step: int, loss: float | None,
        learning_rate: float | None, eta_seconds: float | None, emit_event: bool,
    ) -> LeaseStatus:
        """Store the latest step/loss/lr/ETA (renewing the lease); optionally log an event."""
        values = {"step": step, "loss": loss, "learning_rate": learning_rate, "eta_seconds": eta_seconds,
                  "lease_expires_at": epoch_now() + self.lease_seconds}
        event = ("progress", "", {"step": step, "loss": loss, "learning_rate": learning_rate,
                                  "eta_seconds": eta_seconds}) if emit_event else None
        return self._owned_update(job_id, worker_id, values, event=event)

    def record_validation(self, job_id: str, worker_id: str, previews: list[ValidationPreview]) -> LeaseStatus:
        step = max((p.step for p in previews), default=0)
        return self._owned_update(
            job_id, worker_id, {},
            event=("validation", "validation images", {"step": step, "payload": previews_payload(previews)}),
        )

    def _owned_update(
        self, job_id: str, worker_id: str, values: dict[str, Any],
        event: tuple[str, str, dict[str, Any]] | None = None,
    ) -> LeaseStatus:
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(self._owned(job_id, worker_id))
                .values(updated_at=epoch_now(), **values)
                .returning(jobs.c.cancel_requested)
            ).first()
            if row is None:
                return LeaseStatus(False)
            if event is not None:
                kind, message, extra = event
                self._event(conn, job_id, kind, "RUNNING", message, **extra)
        return LeaseStatus(True, bool(row.cancel_requested))

    def prepare_publish(self, job_id: str, worker_id: str) -> LeaseStatus:
        """The fence right before publishing: still mine? renew the lease for the upload."""
        return self.heartbeat(job_id, worker_id)

    def complete(
        self, job_id: str, worker_id: str, *, output_version: int, metrics: dict[str, float], message: str
    ) -> bool:
        """RUNNING -> SUCCEEDED with the published version, if `worker_id` still owns the job."""
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(self._owned(job_id, worker_id))
                .values(state="SUCCEEDED", output_version=output_version, metrics=metrics,
                        lease_expires_at=None, eta_seconds=0.0, finished_at=epoch_now(),
                        updated_at=epoch_now(), error="")
                .returning(jobs.c.output_name, jobs.c.step)
            ).first()
            if row is None:
                return False
            self._event(conn, job_id, "published", "SUCCEEDED", message, step=row.step,
                        payload={"name": row.output_name, "version": output_version})
        return True

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        """RUNNING -> CANCELLED after the worker stopped on a cancel request."""
        return self._finish(job_id, worker_id, "CANCELLED", "cancelled; nothing published", "")

    def _finish(self, job_id: str, worker_id: str, state: str, message: str, error: str) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(self._owned(job_id, worker_id))
                .values(state=state, lease_expires_at=None, finished_at=epoch_now(), updated_at=epoch_now(),
                        error=error or jobs.c.error, eta_seconds=None)
                .returning(jobs.c.step)
            ).first()
            if row is None:
                return False
            self._event(conn, job_id, "state", state, message, step=row.step)
        return True

    def fail(self, job_id: str, worker_id: str, error: str, *, retryable: bool) -> str | None:
        """End this attempt with `error`: back to QUEUED if retryable and attempts remain,
        else FAILED (CANCELLED if a cancel was requested). None if the job was not ours."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.attempts, jobs.c.cancel_requested)
                .where(self._owned(job_id, worker_id))
                .with_for_update()
            ).first()
            if row is None:
                return None
            state = self._next_state(row.attempts, bool(row.cancel_requested), retryable)
            self._apply_end_of_attempt(conn, job_id, state, error, f"attempt {row.attempts} failed: {error}")
        return state

    def release(self, job_id: str, worker_id: str, reason: str) -> bool:
        """Give the job back (graceful shutdown): QUEUED, and the attempt does not count."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.cancel_requested).where(self._owned(job_id, worker_id)).with_for_update()
            ).first()
            if row is None:
                return False
            if row.cancel_requested:
                self._apply_end_of_attempt(conn, job_id, "CANCELLED", "", "cancelled during shutdown")
                return True
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(state="QUEUED", worker_id=None, lease_expires_at=None, eta_seconds=None,
                        attempts=sa.case((jobs.c.attempts > 0, jobs.c.attempts - 1), else_=0),
                        updated_at=epoch_now())
            )
            self._event(conn, job_id, "state", "QUEUED", f"released by {worker_id}: {reason}")
        return True

    def reap_expired(self) -> list[tuple[str, str]]:
        """Jobs whose lease expired: back to QUEUED, or FAILED after max attempts.

        Returns (job id, new state) for each. Safe to run from every worker at once: rows
        are locked with SKIP LOCKED, and each update re-checks the lease it judged.
        """
        reaped: list[tuple[str, str]] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(jobs.c.id, jobs.c.attempts, jobs.c.cancel_requested, jobs.c.worker_id, jobs.c.error)
                .where(jobs.c.state == "RUNNING", jobs.c.lease_expires_at < epoch_now())
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                state = self._next_state(row.attempts, bool(row.cancel_requested), retryable=True)
                error = f"lease of worker {row.worker_id} expired (attempt {row.attempts})"
                if state == "FAILED" and row.error:
                    error = f"{error}; last error: {row.error}"
                self._apply_end_of_attempt(conn, row.id, state, error, error)
                reaped.append((row.id, state))
        return reaped

    def _next_state(self, attempts: int, cancel_requested: bool, retryable: bool) -> str:
        if cancel_requested:
            return "CANCELLED"
        return "QUEUED" if retryable and attempts < self.max_attempts else "FAILED"

    @staticmethod
    def _apply_end_of_attempt(conn: Connection, job_id: str, state: str, error: str, message: str) -> None:
        values: dict[str, Any] = {"state": state, "lease_expires_at": None, "eta_seconds": None,
                                  "updated_at": epoch_now()}
        if error:
            values["error"] = error
        if state == "QUEUED":
            values["worker_id"] = None
        else:
            values["finished_at"] = epoch_now()
        conn.execute(jobs.update().where(jobs.c.id == job_id).values(**values))
        JobStore._event(conn, job_id, "state", state, message)
