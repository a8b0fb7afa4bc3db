"""Training usage in the job store, so the training API's GetUsage answers for every worker.

A worker's `UsageLedger` (services/common/usage.py) hands each training record to a
`SqlUsage` as well; it adds them up in memory and upserts the per-minute buckets into
`training_usage` (schema.py) at most every `usage_flush_seconds`, on a job's last step and at
shutdown: one small transaction per flush, not one per optimizer step. The upsert adds to the
row (`seconds = seconds + excluded.seconds`), atomic on SQLite and PostgreSQL, so workers
recording the same tenant and minute never lose each other's time. A worker that dies loses
at most its unflushed seconds (the Prometheus counter has them until the scrape).

The training API's ledger reads the table for kind "training" (and flushes its own buffer
first, which in the embedded `atelier serve` holds the in-process worker's latest steps), so
training seconds are counted from one source only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from services.common.config import Settings
from services.common.usage import Sums
from services.training.schema import usage

log = logging.getLogger(__name__)

Key = tuple[int, str, str, str]  # (minute_start, tenant, kind, device)


class SqlUsage:
    """The `SharedUsage` of services/common/usage.py over the job store's engine."""

    kinds = frozenset({"training"})

    def __init__(self, engine: Engine, flush_seconds: float = 10.0, retention_seconds: float = 7 * 86400,
                 clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._flush_seconds = flush_seconds
        self._retention = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time keeps failed batches in order
        self._pending: dict[Key, float] = {}
        self._last_flush = clock()

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings) -> SqlUsage:
        return cls(engine, settings.usage_flush_seconds, settings.usage_retention_hours * 3600)

    def add(self, bucket: int, tenant: str, kind: str, device: str, seconds: float) -> None:
        """Buffer one record; flush when the last flush is `flush_seconds` old."""
        with self._lock:
            key = (bucket, tenant, kind, device)
            self._pending[key] = self._pending.get(key, 0.0) + seconds
            due = self._clock() - self._last_flush >= self._flush_seconds
        if due:
            self.flush()

    def flush(self) -> None:
        """Write the buffer; on a database error keep it for the next flush (never raises)."""
        with self._flush_lock:
            with self._lock:
                batch, self._pending = self._pending, {}
                self._last_flush = self._clock()
            if not batch:
                return
            try:
                self._write(batch)
            except Exception:  # a database blip must not stop training; the seconds wait in memory
                log.warning("usage flush failed; kept for the next one", exc_info=True)
                with self._lock:
                    for key, seconds in batch.items():
                        self._pending[key] = self._pending.get(key, 0.0) + seconds

    def _write(self, batch: dict[Key, float]) -> None:
        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        rows = [{"minute_start": b, "tenant": t, "kind": k, "device": d, "seconds": s}
                for (b, t, k, d), s in sorted(batch.items())]
        statement = dialect.insert(usage)
        statement = statement.on_conflict_do_update(
            index_elements=["minute_start", "tenant", "kind", "device"],
            set_={"seconds": usage.c.seconds + statement.excluded.seconds})
        with self._engine.begin() as conn:
            conn.execute(statement, rows)
            conn.execute(sa.delete(usage).where(usage.c.minute_start < self._clock() - self._retention - 60))

    def totals(self, lo: float, hi: float, tenant: str | None) -> tuple[Sums, float]:
        """Sums per (tenant, kind, device) of the minutes in [lo, hi), and the oldest minute kept."""
        query = sa.select(usage.c.tenant, usage.c.kind, usage.c.device, sa.func.sum(usage.c.seconds)).group_by(
            usage.c.tenant, usage.c.kind, usage.c.device)
        if math.isfinite(lo):
            query = query.where(usage.c.minute_start >= lo)
        if math.isfinite(hi):
            query = query.where(usage.c.minute_start < hi)
        if tenant is not None:
            query = query.where(usage.c.tenant == tenant)
        with self._engine.begin() as conn:
            rows = conn.execute(query).all()
            oldest = conn.execute(sa.select(sa.func.min(usage.c.minute_start))).scalar()
        sums = {(str(t), str(k), str(d)): float(s) for t, k, d, s in rows}
        return sums, math.inf if oldest is None else float(oldest)
