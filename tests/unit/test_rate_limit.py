"""The per-tenant token bucket, on a fake clock."""

from __future__ import annotations

import pytest

from services.common.errors import QuotaExceeded
from services.common.quotas import TenantRateLimiter
from tests.fixtures.clock import ManualClock


def test_burst_then_refill_at_the_rate_with_an_exact_retry_delay() -> None:
    clock = ManualClock()
    limiter = TenantRateLimiter(2.0, burst=3, what="Generate requests", clock=clock)
    for _ in range(3):
        limiter.acquire("a")
    with pytest.raises(QuotaExceeded) as info:
        limiter.acquire("a")
    assert info.value.retry_after_seconds == pytest.approx(0.5)
    assert info.value.violations[0].subject == "tenant:a"
    limiter.acquire("b")  # another tenant's bucket is full
    clock.now += 0.5
    limiter.acquire("a")  # exactly one token came back
    with pytest.raises(QuotaExceeded):
        limiter.acquire("a")
    clock.now += 60
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.acquire("a")
    with pytest.raises(QuotaExceeded):
        limiter.acquire("a")


def test_zero_rate_is_unlimited_and_burst_defaults_to_the_rate() -> None:
    unlimited = TenantRateLimiter(0.0)
    for _ in range(1000):
        unlimited.acquire("a")
    assert TenantRateLimiter(0.5).burst == 1 and TenantRateLimiter(4.2).burst == 5
