"""The job store's usage buckets (services/training/usage_store.py) behind a UsageLedger."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from services.common.usage import UsageLedger
from services.training.db import create_db_engine, migrate
from services.training.usage_store import SqlUsage
from tests.fixtures.clock import ManualClock


def test_two_workers_add_up_and_the_reader_never_counts_its_own_buckets_twice(database_url: str) -> None:
    engine = create_db_engine(database_url)
    migrate(engine)
    clock = ManualClock(6000.0)
    try:
        workers = [UsageLedger(CollectorRegistry(), clock=clock) for _ in range(2)]
        for ledger in workers:
            ledger.share(SqlUsage(engine, flush_seconds=3600, clock=clock))
            ledger.record("acme", "training", "cpu", 1.5)
            ledger.record("acme", "generation", "cpu", 9.0)  # not a shared kind: stays in memory
        workers[0].flush()
        clock.now += 60
        workers[1].record("beta", "training", "gpu", 2.0)
        api = UsageLedger(CollectorRegistry(), clock=clock)
        api.share(SqlUsage(engine, clock=clock))
        assert [(t.tenant, t.kind, t.seconds) for t in api.report(None, None, None).totals] == [
            ("acme", "training", 1.5)]  # worker 1 has not flushed yet
        workers[1].flush()
        totals = {(t.tenant, t.device): t.seconds for t in api.report(None, None, None).totals}
        assert totals == {("acme", "cpu"): 3.0, ("beta", "gpu"): 2.0}
        assert [t.seconds for t in api.report(6000, 6060, "beta").totals] == []
        assert api.report(None, None, "acme").start == 6000.0  # the oldest minute in the table
        # A worker answering for itself reads the table too: its generation from memory only.
        own = {(t.tenant, t.kind): t.seconds for t in workers[1].report(None, None, None).totals}
        assert own == {("acme", "training"): 3.0, ("beta", "training"): 2.0, ("acme", "generation"): 9.0}
    finally:
        engine.dispose()


def test_a_failed_flush_keeps_the_seconds_for_the_next_one(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = create_db_engine(sqlite_url)  # no migration yet: the table is missing
    try:
        store = SqlUsage(engine, flush_seconds=0.0, clock=ManualClock(120.0))
        store.add(120, "acme", "training", "cpu", 1.0)  # flushes at once, and fails
        assert "usage flush failed" in caplog.text
        store.add(120, "acme", "training", "cpu", 0.5)
        migrate(engine)
        store.flush()
        assert store.totals(0, 1e12, "acme") == ({("acme", "training", "cpu"): 1.5}, 120.0)
    finally:
        engine.dispose()
