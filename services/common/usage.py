"""Accounting: device seconds per tenant, as a Prometheus counter and per-minute buckets.

Every process that spends device time on a tenant's behalf records it here: the training
worker per optimizer step (`kind="training"`), the inference engine per request, its share of
the batch's device time (`kind="generation"`). Each record goes to

* the counter `atelier_usage_seconds_total{tenant, kind, device}` (device "cpu" | "gpu"): the
  cluster-wide truth, summed over every replica and worker by Prometheus, for billing and
  alerting on caps;
* per-minute buckets kept in memory for `usage_retention_hours`, which `UsageService.GetUsage`
  answers from: totals per tenant for a [start, end) window (a minute counts when it starts
  inside the window), for the work *this process* did. Buckets are small (one float per tenant, kind, device and minute)
  and lost on restart; the counter is what survives (Prometheus keeps the history);
* a `SharedUsage`, when one is attached (`share`): training processes attach the job store's
  (services/training/usage_store.py), which every worker writes, so a ledger with one answers
  its kinds ("training") from there, for the whole fleet, and never from its own buckets.

Thread-safe: the worker thread, the inference device thread and RPC handlers share a ledger.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from services.common.config import Settings

BUCKET_SECONDS = 60
KINDS = ("training", "generation")
DEVICES = ("cpu", "gpu")
Sums = dict[tuple[str, str, str], float]  # (tenant, kind, device) -> seconds


class SharedUsage(Protocol):
    """Usage of `kinds` kept outside the process, summed over every process that records it."""

    kinds: frozenset[str]

    def add(self, bucket: int, tenant: str, kind: str, device: str, seconds: float) -> None: ...

    def flush(self) -> None: ...

    def totals(self, lo: float, hi: float, tenant: str | None) -> tuple[Sums, float]: ...


def device_label(torch_device: str) -> str:
    """'cuda', 'cuda:1' -> 'gpu'; anything else (cpu, mps) -> 'cpu'."""
    return "gpu" if torch_device.startswith("cuda") else "cpu"


@dataclass(frozen=True)
class UsageTotal:
    tenant: str
    kind: str
    device: str
    seconds: float


@dataclass(frozen=True)
class UsageReport:
    """Totals over the window [start, end) it covered (epoch seconds)."""

    start: float
    end: float
    totals: list[UsageTotal]


class UsageLedger:
    """See the module docstring. One per process (the counter is registered once)."""

    def __init__(self, registry: CollectorRegistry, retention_seconds: float = 7 * 86400,
                 clock: Callable[[], float] = time.time, namespace: str = "atelier") -> None:
        self._counter = Counter(f"{namespace}_usage_seconds", "Device seconds spent per tenant.",
                                ["tenant", "kind", "device"], registry=registry)
        self._retention = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[int, str, str, str], float] = {}
        self._oldest = math.inf
        self._shared: SharedUsage | None = None

    @classmethod
    def from_settings(cls, settings: Settings, registry: CollectorRegistry) -> UsageLedger:
        return cls(registry, settings.usage_retention_hours * 3600)

    def share(self, shared: SharedUsage) -> None:
        """Also hand `shared.kinds` records to `shared`, and answer those kinds from it."""
        self._shared = shared

    def flush(self) -> None:
        """Write what the shared store has buffered (a job's end, shutdown)."""
        if self._shared is not None:
            self._shared.flush()

    def record(self, tenant: str, kind: str, device: str, seconds: float) -> None:
        """Add `seconds` (>= 0) of `device` time spent on `tenant`'s `kind` of work, now."""
        if seconds <= 0 or not math.isfinite(seconds):
            return
        self._counter.labels(tenant, kind, device).inc(seconds)
        now = self._clock()
        bucket = int(now // BUCKET_SECONDS) * BUCKET_SECONDS
        with self._lock:
            key = (bucket, tenant, kind, device)
            self._buckets[key] = self._buckets.get(key, 0.0) + seconds
            self._oldest = min(self._oldest, bucket)
            self._expire(now)
        shared = self._shared
        if shared is not None and kind in shared.kinds:
            shared.add(bucket, tenant, kind, device, seconds)

    def report(self, start: float | None, end: float | None, tenant: str | None) -> UsageReport:
        """Totals for one tenant or (None) every tenant, sorted by tenant, kind, device.

        Usage recorded at time t counts when its minute, floor(t / 60) * 60, lies in
        [start, end); None means unbounded. The report echoes the window it covered (an
        unbounded start becomes the oldest retained minute, an unbounded end now). Kinds a
        shared store holds come from it (after flushing this process's buffer): may block on I/O.
        """
        now = self._clock()
        lo = -math.inf if start is None else start
        hi = math.inf if end is None else end
        shared = self._shared
        sums: Sums = {}
        shared_oldest = math.inf
        if shared is not None:
            shared.flush()
            sums, shared_oldest = shared.totals(lo, hi, tenant)
        skip = shared.kinds if shared is not None else frozenset()
        with self._lock:
            self._expire(now)
            for (bucket, who, kind, device), seconds in self._buckets.items():
                if lo <= bucket < hi and (tenant is None or who == tenant) and kind not in skip:
                    sums[(who, kind, device)] = sums.get((who, kind, device), 0.0) + seconds
            oldest = min(self._oldest, shared_oldest)
        covered_end = now if end is None else end
        covered_start = start if start is not None else min(oldest, covered_end)
        totals = [UsageTotal(t, k, d, s) for (t, k, d), s in sorted(sums.items())]
        return UsageReport(float(covered_start), float(covered_end), totals)

    def _expire(self, now: float) -> None:
        cutoff = now - self._retention
        if self._oldest >= cutoff:
            return
        for key in [k for k in self._buckets if k[0] + BUCKET_SECONDS <= cutoff]:
            del self._buckets[key]
        self._oldest = min((k[0] for k in self._buckets), default=math.inf)
