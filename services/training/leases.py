"""The worker side of the job store: claims, leases, progress and the end of an attempt.

Every write here is *fenced* by ownership: it only touches the row while
`state = 'RUNNING' AND worker_id = <me>`. A worker whose lease was reaped and whose job was
claimed by another worker finds its writes hitting zero rows, learns it lost the job
(`LeaseStatus.owned == False`) and stops without publishing. Lease times are computed
from the database clock (`epoch_now`), so every worker's lease uses one clock.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.training.records import JobRecord, LeaseStatus, ValidationPreview, previews_payload
from services.training.schema import epoch_now, events, jobs
from services.training.webhook_outbox import enqueue_terminal


def append_event(conn: Connection, job_id: str, kind: str, state: str, message: str = "", **values: Any) -> None:
    """Add one entry to a job's event log (in the caller's transaction).

    Every state change logs here, so this is also where a terminal state enqueues the job's
    webhook delivery, in the same transaction (the outbox: services/training/webhook_outbox.py).
    """
    conn.execute(
        events.insert().values(job_id=job_id, created_at=epoch_now(), kind=kind, state=state, message=message,
                               **values)
    )
    if kind in ("state", "published"):
        enqueue_terminal(conn, job_id, state)


# pg_advisory_xact_lock(namespace, hashtext(tenant)): serialises one tenant's quota checks.
TENANT_LOCK_NAMESPACE = 0x41544C51  # "ATLQ"


def lock_tenant(conn: Connection, tenant: str) -> None:
    """Serialise one tenant's quota checks until the transaction ends (PostgreSQL; SQLite's
    BEGIN IMMEDIATE already serialises every writer)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:ns, hashtext(:tenant))"),
                     {"ns": TENANT_LOCK_NAMESPACE, "tenant": tenant})


def count_in_state(conn: Connection, tenant: str, state: str) -> int:
    """How many of the tenant's jobs are in `state` (index ix_training_jobs_tenant_state)."""
    query = sa.select(sa.func.count()).select_from(jobs).where(jobs.c.tenant == tenant, jobs.c.state == state)
    return int(conn.execute(query).scalar() or 0)


def owned_by(job_id: str, worker_id: str) -> sa.ColumnElement[bool]:
    """The fence: the row is this worker's running job."""
    return sa.and_(jobs.c.id == job_id, jobs.c.worker_id == worker_id, jobs.c.state == "RUNNING")


class LeaseOps:
    """Worker-side operations; `JobStore` mixes them in (see services/training/jobstore.py)."""

    engine: Engine
    lease_seconds: float
    max_attempts: int
    max_running_per_tenant: int

    def claim(self, worker_id: str) -> JobRecord | None:
        """Take the oldest QUEUED job and lease it to `worker_id` (FOR UPDATE SKIP LOCKED).

        With a concurrent-jobs quota, jobs of tenants already running that many are skipped
        (they stay QUEUED); the count is re-checked under the tenant's lock, because two
        workers may pick two jobs of one tenant at once with SKIP LOCKED.
        """
        with self.engine.begin() as conn:
            query = sa.select(jobs.c.id, jobs.c.tenant).where(jobs.c.state == "QUEUED")
            if self.max_running_per_tenant > 0:
                running = jobs.alias("running")
                count = (sa.select(sa.func.count()).select_from(running)
                         .where(running.c.tenant == jobs.c.tenant, running.c.state == "RUNNING")
                         .scalar_subquery())
                query = query.where(count < self.max_running_per_tenant)
            picked = conn.execute(
                query.order_by(jobs.c.created_at, jobs.c.id).limit(1).with_for_update(skip_locked=True, of=jobs)
            ).first()
            if picked is None:
                return None
            if self.max_running_per_tenant > 0:
                lock_tenant(conn, picked.tenant)
                if count_in_state(conn, picked.tenant, "RUNNING") >= self.max_running_per_tenant:
                    return None  # lost a race to another worker; the job waits for the next poll
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
            append_event(conn, record.id, "state", "RUNNING",
                        f"claimed by {worker_id} (attempt {record.attempts})", step=record.step)
        return record

    def heartbeat(self, job_id: str, worker_id: str) -> LeaseStatus:
        """Renew the lease if `worker_id` still owns the job."""
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(owned_by(job_id, worker_id))
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

    def record_validation(self, job_id: str, worker_id: str, previews: list[ValidationPreview],
                          loss: float | None = None, held_out: dict[str, Any] | None = None) -> LeaseStatus:
        """A validation event; its loss goes into the running job's metrics (`validation_loss`,
        `validation_step`) so each Watch event carries the newest one (complete() replaces them).

        `held_out` (heldout_validation runs): {"step", "loss", "best_loss", "best_step", and
        "warning" when the overfit alarm fires}, kept in the event for Watch and, as
        best_validation_loss / best_validation_step / overfit_step, in the job's metrics.
        """
        step = int(held_out["step"]) if held_out else max((p.step for p in previews), default=0)
        metrics: dict[str, Any] = {"validation_loss": loss, "validation_step": float(step)} if loss is not None else {}
        payload = previews_payload(previews)
        message = "validation images"
        if held_out:
            payload["validation"] = held_out
            metrics.update(best_validation_loss=held_out["best_loss"],
                           best_validation_step=float(held_out["best_step"]))
            if held_out.get("overfit_step"):
                metrics["overfit_step"] = float(held_out["overfit_step"])
            message = held_out.get("warning") or "validation loss"
        return self._owned_update(
            job_id, worker_id, {"metrics": metrics} if metrics else {},
            event=("validation", message, {"step": step, "payload": payload}),
        )

    def _owned_update(
        self, job_id: str, worker_id: str, values: dict[str, Any],
        event: tuple[str, str, dict[str, Any]] | None = None,
    ) -> LeaseStatus:
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(owned_by(job_id, worker_id))
                .values(updated_at=epoch_now(), **values)
                .returning(jobs.c.cancel_requested)
            ).first()
            if row is None:
                return LeaseStatus(False)
            if event is not None:
                kind, message, extra = event
                append_event(conn, job_id, kind, "RUNNING", message, **extra)
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
                .where(owned_by(job_id, worker_id))
                .values(state="SUCCEEDED", output_version=output_version, metrics=metrics,
                        lease_expires_at=None, eta_seconds=0.0, finished_at=epoch_now(),
                        updated_at=epoch_now(), error="")
                .returning(jobs.c.output_name, jobs.c.step)
            ).first()
            if row is None:
                return False
            append_event(conn, job_id, "published", "SUCCEEDED", message, step=row.step,
                        payload={"name": row.output_name, "version": output_version})
        return True

    def finish_cancelled(self, job_id: str, worker_id: str) -> bool:
        """RUNNING -> CANCELLED after the worker stopped on a cancel request."""
        return self._finish(job_id, worker_id, "CANCELLED", "cancelled; nothing published", "")

    def _finish(self, job_id: str, worker_id: str, state: str, message: str, error: str) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(
                jobs.update()
                .where(owned_by(job_id, worker_id))
                .values(state=state, lease_expires_at=None, finished_at=epoch_now(), updated_at=epoch_now(),
                        error=error or jobs.c.error, eta_seconds=None)
                .returning(jobs.c.step)
            ).first()
            if row is None:
                return False
            append_event(conn, job_id, "state", state, message, step=row.step)
        return True

    def fail(self, job_id: str, worker_id: str, error: str, *, retryable: bool) -> str | None:
        """End this attempt with `error`: back to QUEUED if retryable and attempts remain,
        else FAILED (CANCELLED if a cancel was requested). None if the job was not ours."""
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.attempts, jobs.c.cancel_requested)
                .where(owned_by(job_id, worker_id))
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
                sa.select(jobs.c.cancel_requested).where(owned_by(job_id, worker_id)).with_for_update()
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
            append_event(conn, job_id, "state", "QUEUED", f"released by {worker_id}: {reason}")
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
        append_event(conn, job_id, "state", state, message)

