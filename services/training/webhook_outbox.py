"""The webhook outbox in the job store: enqueue with the state change, claim, record results.

A terminal transition (SUCCEEDED, FAILED, CANCELLED) of a job with a webhook inserts one
delivery row *in the transaction that changes the state* (`enqueue_terminal`, called by
`leases.append_event`), so a crash right after the change cannot lose the notification: the
row is there and any process's dispatcher sends it. Claiming a due row pushes its
`next_attempt_at` past the HTTP timeout (an in-flight lease, FOR UPDATE SKIP LOCKED), so two
dispatchers do not send one delivery at the same time; a dispatcher that dies mid-send
leaves the row due again once that lease passes. Delivery is therefore at least once, with
a stable idempotency key (`<job id>:<STATE>`) for receivers to drop repeats.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from services.training.schema import TERMINAL_STATES, epoch_now, jobs, webhook_deliveries

# Seconds past the HTTP timeout that a claimed delivery stays invisible to other dispatchers.
CLAIM_MARGIN_SECONDS = 5.0
JOB_FIELDS = ("id", "tenant", "request_id", "method", "state", "output_name", "output_version", "step",
              "total_steps", "attempts", "error", "metrics", "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class Delivery:
    """One claimed delivery: what to POST where, signed with the job's secret."""

    id: int
    job_id: str
    idempotency_key: str
    url: str
    body: bytes
    secret: str
    attempts: int  # including this one


def idempotency_key(job_id: str, state: str) -> str:
    return f"{job_id}:{state}"


def event_body(job: dict[str, Any], key: str) -> str:
    """The JSON body, fixed at enqueue time so every retry sends the very same bytes."""
    payload = {"type": f"training_job.{str(job['state']).lower()}", "idempotency_key": key,
               "job": {name: job.get(name) for name in JOB_FIELDS}}
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def enqueue_terminal(conn: Connection, job_id: str, state: str) -> None:
    """Insert the delivery of `state` if the job has a webhook (in the caller's transaction)."""
    if state not in TERMINAL_STATES:
        return
    row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
    if row is None or not row.webhook_url:
        return
    key = idempotency_key(job_id, state)
    values = dict(row._mapping)
    values["metrics"] = dict(values.get("metrics") or {})
    conn.execute(webhook_deliveries.insert().values(
        job_id=job_id, idempotency_key=key, url=row.webhook_url, body=event_body(values, key),
        status="PENDING", attempts=0, next_attempt_at=epoch_now(), last_error="", created_at=epoch_now()))


def claim_due(engine: Engine, limit: int, in_flight_seconds: float) -> list[Delivery]:
    """Take up to `limit` due deliveries, hiding them from other dispatchers while in flight."""
    with engine.begin() as conn:
        rows = conn.execute(
            sa.select(webhook_deliveries.c.id)
            .where(webhook_deliveries.c.status == "PENDING", webhook_deliveries.c.next_attempt_at <= epoch_now())
            .order_by(webhook_deliveries.c.next_attempt_at, webhook_deliveries.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        conn.execute(webhook_deliveries.update().where(webhook_deliveries.c.id.in_(ids)).values(
            attempts=webhook_deliveries.c.attempts + 1,
            next_attempt_at=epoch_now() + in_flight_seconds + CLAIM_MARGIN_SECONDS))
        claimed = conn.execute(
            sa.select(webhook_deliveries, jobs.c.webhook_secret)
            .join(jobs, jobs.c.id == webhook_deliveries.c.job_id)
            .where(webhook_deliveries.c.id.in_(ids))
            .order_by(webhook_deliveries.c.id)
        ).all()
    return [Delivery(r.id, r.job_id, r.idempotency_key, r.url, r.body.encode(), r.webhook_secret or "", r.attempts)
            for r in claimed]


def record_success(engine: Engine, delivery_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.update().where(webhook_deliveries.c.id == delivery_id).values(
            status="DELIVERED", delivered_at=epoch_now(), last_error=""))


def record_failure(engine: Engine, delivery_id: int, error: str, retry_in: float | None) -> None:
    """Due again in `retry_in` seconds, or GAVE_UP when None (attempts exhausted)."""
    values: dict[str, Any] = {"last_error": error[:2000]}
    if retry_in is None:
        values["status"] = "GAVE_UP"
    else:
        values["next_attempt_at"] = epoch_now() + retry_in
    with engine.begin() as conn:
        conn.execute(webhook_deliveries.update().where(webhook_deliveries.c.id == delivery_id).values(**values))


def deliveries_of(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    """Every delivery row of a job (for operators and tests)."""
    with engine.begin() as conn:
        rows = conn.execute(sa.select(webhook_deliveries).where(webhook_deliveries.c.job_id == job_id)
                            .order_by(webhook_deliveries.c.id))
        return [dict(r._mapping) for r in rows]
