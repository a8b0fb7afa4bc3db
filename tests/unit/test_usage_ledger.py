"""UsageLedger: minute buckets, [start, end) windows, tenant scoping, retention, the counter."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from services.common.usage import UsageLedger, UsageTotal, device_label
from tests.fixtures.clock import ManualClock


def make(now: float = 6000.0, retention: float = 3600.0) -> tuple[UsageLedger, ManualClock, CollectorRegistry]:
    clock, registry = ManualClock(now), CollectorRegistry()
    return UsageLedger(registry, retention, clock=clock), clock, registry


def test_windows_count_the_minutes_that_start_inside_them() -> None:
    ledger, clock, _ = make(6000.0)  # minute 6000
    ledger.record("a", "generation", "cpu", 1.5)
    clock.now = 6059.9
    ledger.record("a", "generation", "cpu", 0.5)  # same minute
    clock.now = 6060.0
    ledger.record("a", "training", "gpu", 4.0)  # next minute
    ledger.record("b", "generation", "cpu", 9.0)
    assert ledger.report(6000, 6060, "a").totals == [UsageTotal("a", "generation", "cpu", 2.0)]
    assert ledger.report(6060, None, "a").totals == [UsageTotal("a", "training", "gpu", 4.0)]
    assert ledger.report(None, None, "a").totals == [UsageTotal("a", "generation", "cpu", 2.0),
                                                     UsageTotal("a", "training", "gpu", 4.0)]
    assert ledger.report(5000, 6000, "a").totals == []  # before: nothing
    assert ledger.report(6001, 6060, "a").totals == []  # the 6000 minute starts before the window
    everyone = ledger.report(None, None, None)
    assert [t.tenant for t in everyone.totals] == ["a", "a", "b"]
    assert (everyone.start, everyone.end) == (6000.0, 6060.0)  # oldest minute .. now


def test_retention_drops_old_minutes_and_ignores_non_positive() -> None:
    ledger, clock, _ = make(6000.0, retention=600.0)
    ledger.record("a", "generation", "cpu", 1.0)
    ledger.record("a", "generation", "cpu", 0.0)
    ledger.record("a", "generation", "cpu", -3.0)
    ledger.record("a", "generation", "cpu", float("nan"))
    assert ledger.report(None, None, "a").totals == [UsageTotal("a", "generation", "cpu", 1.0)]
    clock.now = 6000.0 + 660.0
    ledger.record("a", "training", "cpu", 2.0)
    assert ledger.report(None, None, "a").totals == [UsageTotal("a", "training", "cpu", 2.0)]


def test_counter_and_device_labels() -> None:
    ledger, _clock, registry = make()
    ledger.record("a", "training", device_label("cuda:1"), 2.5)
    ledger.record("a", "training", device_label("cpu"), 1.0)
    value = registry.get_sample_value("atelier_usage_seconds_total",
                                      {"tenant": "a", "kind": "training", "device": "gpu"})
    assert value == 2.5
    assert registry.get_sample_value("atelier_usage_seconds_total",
                                     {"tenant": "a", "kind": "training", "device": "cpu"}) == 1.0
