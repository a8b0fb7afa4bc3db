"""The job store's tables (SQLAlchemy Core) and a database-clock expression.

The live schema is defined here for queries; Alembic migrations under
`services/training/migrations/versions/` create it and must be kept in step (a unit test
compares them). All times are float seconds since the epoch taken from the *database*
clock (`epoch_now()`), so leases compare times from one clock even when workers run on
machines whose clocks drift apart.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from services.training.sql import JOBS_TABLE

EVENTS_TABLE = "training_job_events"
WEBHOOKS_TABLE = "training_webhook_deliveries"
USAGE_TABLE = "training_usage"

STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

metadata = sa.MetaData()

# Integer primary keys autoincrement as BIGINT on PostgreSQL, INTEGER (rowid) on SQLite.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _job_child_keys() -> tuple[sa.Column[Any], sa.Column[Any]]:
    """The keys of a table whose rows belong to one job: its own autoincrement id, and the job's
    id (the rows go when the job does). New columns each call: a Column belongs to one table."""
    return (
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), sa.ForeignKey(f"{JOBS_TABLE}.id", ondelete="CASCADE"), nullable=False),
    )


jobs = sa.Table(
    JOBS_TABLE,
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("method", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("spec", sa.JSON(), nullable=False),
    sa.Column("config", sa.JSON(), nullable=True),
    sa.Column("step", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("total_steps", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("loss", sa.Double(), nullable=True),
    sa.Column("learning_rate", sa.Double(), nullable=True),
    sa.Column("eta_seconds", sa.Double(), nullable=True),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("error", sa.Text(), nullable=False, server_default=""),
    sa.Column("worker_id", sa.String(255), nullable=True),
    sa.Column("lease_expires_at", sa.Double(), nullable=True),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("output_name", sa.String(128), nullable=False),
    sa.Column("output_version", sa.Integer(), nullable=True),
    sa.Column("resumed_from_step", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("metrics", sa.JSON(), nullable=True),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("updated_at", sa.Double(), nullable=False),
    sa.Column("started_at", sa.Double(), nullable=True),
    sa.Column("finished_at", sa.Double(), nullable=True),
    # Job webhook (migration 0002): where terminal states are POSTed and the HMAC key; the
    # secret never leaves the store through JobRecord.
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("webhook_secret", sa.String(256), nullable=True),
    sa.UniqueConstraint("tenant", "request_id", name="uq_training_jobs_tenant_request"),
    sa.Index("ix_training_jobs_state_created", "state", "created_at"),
    sa.Index("ix_training_jobs_tenant_created", "tenant", "created_at"),
    sa.Index("ix_training_jobs_tenant_state", "tenant", "state"),  # per-tenant quota counts
)

events = sa.Table(
    EVENTS_TABLE,
    metadata,
    *_job_child_keys(),
    sa.Column("created_at", sa.Double(), nullable=False),
    # "state" (a transition), "progress" (step/loss/lr/eta), "validation", "published".
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("step", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("loss", sa.Double(), nullable=True),
    sa.Column("learning_rate", sa.Double(), nullable=True),
    sa.Column("eta_seconds", sa.Double(), nullable=True),
    sa.Column("message", sa.Text(), nullable=False, server_default=""),
    sa.Column("payload", sa.JSON(), nullable=True),
    sa.Index("ix_training_job_events_job_id", "job_id", "id"),
)


# The webhook outbox: one row per (job, terminal state), written in the transaction that
# changes the state, delivered by any process's dispatcher (services/training/webhooks.py).
webhook_deliveries = sa.Table(
    WEBHOOKS_TABLE,
    metadata,
    *_job_child_keys(),
    sa.Column("idempotency_key", sa.String(128), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("body", sa.Text(), nullable=False),
    # PENDING (due at next_attempt_at) -> DELIVERED | GAVE_UP
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Double(), nullable=False),
    sa.Column("last_error", sa.Text(), nullable=False, server_default=""),
    sa.Column("created_at", sa.Double(), nullable=False),
    sa.Column("delivered_at", sa.Double(), nullable=True),
    sa.UniqueConstraint("idempotency_key", name="uq_training_webhook_deliveries_key"),
    sa.Index("ix_training_webhook_deliveries_due", "status", "next_attempt_at"),
)


# Device seconds per (minute, tenant, kind, device), upserted by every training worker
# (services/training/usage_store.py, migration 0003) so the training API's GetUsage sums the
# fleet. minute_start is epoch seconds on the recording worker's clock, a multiple of 60.
usage = sa.Table(
    USAGE_TABLE,
    metadata,
    sa.Column("minute_start", sa.BigInteger(), primary_key=True),
    sa.Column("tenant", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),
    sa.Column("device", sa.String(8), primary_key=True),
    sa.Column("seconds", sa.Double(), nullable=False),
)


class epoch_now(FunctionElement[float]):
    """Seconds since the epoch on the database server's clock, as a double."""

    type = sa.Double()
    inherit_cache = True


@compiles(epoch_now, "postgresql")
def _pg_epoch_now(element: epoch_now, compiler: SQLCompiler, **kw: Any) -> str:
    # clock_timestamp(), not now(): now() is frozen at transaction start.
    return "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"


@compiles(epoch_now, "sqlite")
def _sqlite_epoch_now(element: epoch_now, compiler: SQLCompiler, **kw: Any) -> str:
    # julianday('now') has millisecond resolution, enough for leases of seconds.
    return "((julianday('now') - 2440587.5) * 86400.0)"
