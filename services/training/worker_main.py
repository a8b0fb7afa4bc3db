"""The training worker as a process: `atelier worker` or `python -m services.training.worker_main`.

SIGTERM/SIGINT ask the worker to stop: the running job trains on until its next checkpoint
is in the registry (or `shutdown_grace_seconds` pass), then the trainer stops, the job is
released back to the queue without using up an attempt, and the next worker resumes from
that checkpoint. A second signal exits at once; the lease then expires and the job is
reaped like a crash. Set the pod's terminationGracePeriodSeconds above the grace period.

The process also serves grpc.health.v1 on `worker_health_port` (services/training/
worker_health.py: readiness follows the job store and the registry) and runs the periodic
blob garbage collection every `gc_interval_seconds` (services/registry/gc.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

from prometheus_client import CollectorRegistry

from services.common.config import Settings
from services.common.process import apply_torch_threads
from services.common.telemetry import configure_logging, start_metrics_http
from services.common.usage import device_label
from services.registry.gc import PeriodicCollector
from services.registry.registry import Registry
from services.training.jobstore import JobStore
from services.training.metrics import WorkerMetrics, register_store_metrics
from services.training.usage_store import SqlUsage
from services.training.webhooks import WebhookDispatcher
from services.training.worker import Worker
from services.training.worker_health import WorkerHealth

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, worker_id: str = "") -> int:
    """Run one worker until signalled; returns the process exit code."""
    configure_logging(settings)
    logging.getLogger().setLevel(settings.log_level.upper())
    apply_torch_threads(settings)
    store = JobStore.open(settings)  # runs `alembic upgrade head` first
    metrics_registry = CollectorRegistry()
    register_store_metrics(metrics_registry, store)
    metrics_http = start_metrics_http(metrics_registry, settings.metrics_port)
    registry = Registry.from_settings(settings)
    metrics = WorkerMetrics(metrics_registry, device=device_label(settings.training_device))
    metrics.usage.share(SqlUsage.from_settings(store.engine, settings))  # the training API sums every worker's
    worker = Worker(settings, store, registry, worker_id=worker_id, metrics=metrics)
    health = WorkerHealth(settings, store, registry).start() if settings.worker_health_port else None
    collector = PeriodicCollector(registry, interval=settings.gc_interval_seconds,
                                  grace_seconds=settings.gc_grace_seconds).start()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if worker.shutdown.is_set():
            log.warning("second signal: exiting now")
            os._exit(128 + signum)
        log.info("signal received: stopping after the next checkpoint", extra={"signal": signum})
        worker.shutdown.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    webhooks = WebhookDispatcher(settings, store.engine)  # any training process delivers webhooks
    webhooks.start()
    try:
        worker.run_forever()
    finally:
        collector.stop()
        if health is not None:
            health.stop()
        webhooks.close()
        if metrics_http is not None:
            metrics_http.close()
        metrics.usage.flush()
        store.close()
    return 0


def main() -> None:
    sys.exit(run_worker(Settings.model_validate({})))


if __name__ == "__main__":
    main()
