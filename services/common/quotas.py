"""Per-tenant rate limits: a token bucket per tenant, refusing with QuotaExceeded (never dropping).

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; each call takes
one. An empty bucket refuses at once with RESOURCE_EXHAUSTED + QuotaFailure + RetryInfo whose
delay is exactly when the next token will be there, so a client that honours RetryInfo
succeeds on its next try. Buckets are per process: with N replicas behind a load balancer a
tenant gets up to N x rate (documented in docs/operations.md).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import QuotaExceeded


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TenantRateLimiter:
    """`acquire(tenant)` takes a token or raises QuotaExceeded; rate 0 means unlimited."""

    def __init__(self, rate: float, burst: int = 0, what: str = "requests",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = max(0.0, rate)
        self.burst = float(burst if burst > 0 else max(1, math.ceil(self.rate)))
        self._what = what
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, tenant: str) -> None:
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(tenant, _Bucket(self.burst, now))
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait = (1.0 - bucket.tokens) / self.rate
        raise QuotaExceeded(
            tenant, f"{self._what}: at most {self.rate:g} per second (burst {self.burst:g})", wait)
