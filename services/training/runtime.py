"""The training side of one process: API servicers, optional in-process workers, and the
background parts every training process runs (webhook delivery, registry garbage collection).

`atelier serve` (embedded default) uses `TrainingRuntime` to host TrainingService and
RegistryService on its server and run one worker in a background thread, all sharing one
job store (SQLite file by default) and one registry (local directory by default). The
cluster's training-API Deployment uses the same class with `workers=0`; worker pods run
`atelier worker` (services/training/worker_main.py) instead. services/runtime.py composes it
with inference into a whole process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection
from pathlib import Path

from prometheus_client import CollectorRegistry

from services.common.config import Settings
from services.common.server import ServiceBinding
from services.common.usage import UsageLedger, device_label
from services.registry.gc import PeriodicCollector
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.training.jobstore import JobStore
from services.training.metrics import WorkerMetrics, register_store_metrics
from services.training.servicer import training_bindings
from services.training.usage_store import SqlUsage
from services.training.webhooks import WebhookDispatcher
from services.training.worker import Worker

log = logging.getLogger(__name__)


class TrainingRuntime:
    """Training API + registry API bindings and `workers` in-process worker threads."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: Registry | None = None,
        store: JobStore | None = None,
        metrics_registry: CollectorRegistry | None = None,
        workers: int = 1,
        local_base_models: Collection[str] = (),
        usage: UsageLedger | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or Registry.from_settings(settings)
        self.store = store or JobStore.open(settings)
        self._owns_store = store is None
        self._local_base_models = local_base_models
        worker_metrics = None
        if metrics_registry is not None:
            register_store_metrics(metrics_registry, self.store)
            worker_metrics = WorkerMetrics(metrics_registry, usage=usage,
                                           device=device_label(settings.training_device))
        # Training usage lives in the job store: workers write it, GetUsage here reads the fleet's.
        self.usage = worker_metrics.usage if worker_metrics is not None else usage
        if self.usage is not None:
            self.usage.share(SqlUsage.from_settings(self.store.engine, settings))
        base_id = settings.worker_id or ""
        self.workers = [
            Worker(settings, self.store, self.registry, metrics=worker_metrics,
                   worker_id=f"{base_id}-{i}" if base_id else "")
            for i in range(workers)
        ]
        self._threads: list[threading.Thread] = []
        # Processes that train also collect the registry's garbage blobs (services/registry/gc.py).
        self.collector = PeriodicCollector(self.registry, interval=settings.gc_interval_seconds if workers else 0,
                                           grace_seconds=settings.gc_grace_seconds)
        # Every training process delivers due job webhooks (services/training/webhooks.py).
        self.webhooks = WebhookDispatcher(settings, self.store.engine)

    def bindings(self) -> list[ServiceBinding]:
        """TrainingService and RegistryService, for `start_server`."""
        return [
            *training_bindings(self.settings, self.store, self.registry),
            *registry_bindings(
                self.registry,
                local_base_models=self._local_base_models,
                work_dir=Path(self.settings.data_dir) / "tmp",
                stored_bytes_quota=self.settings.quota_stored_bytes,
            ),
        ]

    def start_workers(self) -> None:
        """Start the webhook dispatcher and each worker's loop in daemon threads (idempotent)."""
        if self._threads:
            return
        self.webhooks.start()
        self.collector.start()
        for worker in self.workers:
            thread = threading.Thread(target=worker.run_forever, name=f"worker-{worker.worker_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Ask workers to stop (a running job is released back to the queue) and wait."""
        for worker in self.workers:
            worker.shutdown.set()
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("worker thread did not stop in time", extra={"thread": thread.name})
        self._threads.clear()
        if self.usage is not None:
            self.usage.flush()
        self.collector.stop()
        self.webhooks.close()
        if self._owns_store:
            self.store.close()

    def __enter__(self) -> TrainingRuntime:
        self.start_workers()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
