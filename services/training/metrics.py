"""Prometheus metrics of the training engine, in a registry the caller injects.

Queue depth and jobs-by-state are read from the database at scrape time (a custom
collector) rather than tracked in-process: the truth is shared by every API pod and
worker, and a gauge kept by one process would only see its own transitions. Step time and
heartbeats are per-worker events, so they are ordinary histogram/counter metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.usage import UsageLedger
from services.training.jobstore import JobStore
from services.training.schema import STATES

log = logging.getLogger(__name__)

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class JobStoreCollector(Collector):
    """Scrape-time gauges: queue depth (the KEDA statement) and jobs by state."""

    def __init__(self, store: JobStore, namespace: str = "atelier") -> None:
        self._store = store
        self._ns = namespace

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(f"{self._ns}_training_queue_depth", "Training jobs waiting for a worker.")
        by_state = GaugeMetricFamily(
            f"{self._ns}_training_jobs", "Training jobs by state.", labels=["state"]
        )
        try:
            counts = self._store.counts_by_state()
            depth.add_metric([], float(self._store.queue_depth()))
        except Exception:  # a scrape must not fail because the database blinked
            log.warning("job store unavailable for metrics scrape", exc_info=True)
            return
        for state in STATES:
            by_state.add_metric([state], float(counts.get(state, 0)))
        yield depth
        yield by_state


class WorkerMetrics:
    """Per-worker training metrics, and the process's usage ledger (services/common/usage.py)."""

    def __init__(self, registry: CollectorRegistry, namespace: str = "atelier", *,
                 usage: UsageLedger | None = None, device: str = "cpu") -> None:
        self.usage = usage if usage is not None else UsageLedger(registry, namespace=namespace)
        self.device = device  # usage label: "cpu" | "gpu"
        self.step_seconds = Histogram(
            f"{namespace}_training_step_seconds",
            "Wall time of one optimizer step.",
            ["method"],
            buckets=STEP_BUCKETS,
            registry=registry,
        )
        self.heartbeats = Counter(
            f"{namespace}_training_worker_heartbeats",
            "Lease renewals a worker attempted, by result (ok, lost, error).",
            ["result"],
            registry=registry,
        )
        self.jobs_finished = Counter(
            f"{namespace}_training_worker_jobs_finished",
            "Attempts this worker ended, by outcome.",
            ["outcome"],
            registry=registry,
        )


    def record_usage(self, tenant: str, seconds: float, *, last_step: bool = False) -> None:
        """Training device time: each step's wall time (the first one includes the attempt's set-up).

        The last step flushes the shared store, so a job's usage is in SQL before it succeeds."""
        self.usage.record(tenant, "training", self.device, seconds)
        if last_step:
            self.usage.flush()


def register_store_metrics(registry: CollectorRegistry, store: JobStore) -> JobStoreCollector:
    """Attach the scrape-time job gauges to `registry`."""
    collector = JobStoreCollector(store)
    registry.register(collector)
    return collector
