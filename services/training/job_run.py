"""One attempt of one job on one worker: the lease keeper and the trainer's callbacks.

`LeaseKeeper` renews the lease on a timer in its own thread, independent of training
progress, so a slow step (a big model, a long download) never lets the lease lapse. Every
fenced write (heartbeat or per-step progress) also tells the worker whether the job was
cancelled or taken away; `should_stop` turns either into "stop before the next step".
If renewals keep failing (database unreachable) for a whole lease period the keeper
assumes the lease is gone: another worker may already own the job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.registry.registry import Registry
from services.training.jobstore import JobStore
from services.training.metrics import WorkerMetrics
from services.training.records import JobRecord, LeaseStatus, ValidationPreview

log = logging.getLogger(__name__)

PROGRESS_EVENT_INTERVAL = 0.5  # seconds between progress events in the Watch log


class LeaseKeeper:
    """Heartbeats one job's lease and tracks lost / cancelled / shutdown flags."""

    def __init__(
        self, store: JobStore, job_id: str, worker_id: str, interval: float,
        metrics: WorkerMetrics | None, shutdown: threading.Event,
    ) -> None:
        self._store = store
        self._job_id = job_id
        self._worker_id = worker_id
        self._interval = max(0.05, interval)
        self._metrics = metrics
        self.shutdown = shutdown
        self.lost = threading.Event()
        self.cancelled = threading.Event()
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)

    def observe(self, status: LeaseStatus) -> None:
        """Fold the answer of any fenced write into the flags."""
        if not status.owned:
            self.lost.set()
            return
        self._last_ok = time.monotonic()
        if status.cancel_requested:
            self.cancelled.set()

    def _count(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.heartbeats.labels(result).inc()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                status = self._store.heartbeat(self._job_id, self._worker_id)
            except Exception:
                self._count("error")
                log.warning("heartbeat failed", exc_info=True, extra={"job_id": self._job_id})
                if time.monotonic() - self._last_ok > self._store.lease_seconds:
                    self.lost.set()
                continue
            self._count("ok" if status.owned else "lost")
            self.observe(status)
            if self.lost.is_set():
                log.warning("lease lost", extra={"job_id": self._job_id, "worker_id": self._worker_id})
                return

    @property
    def should_stop(self) -> bool:
        return self.lost.is_set() or self.cancelled.is_set() or self.shutdown.is_set()


class StepPace:
    """The timing of one attempt's steps: each step's duration, the ETA, and which steps emit a
    progress event (at most one per `event_interval` seconds, and always the last)."""

    def __init__(self, event_interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._event_interval = event_interval
        self._clock = clock
        self.started = self._last_step_at = clock()
        self._last_event_at = 0.0
        self._first_step: int | None = None

    def step(self, step: int, total: int) -> tuple[float, float, bool]:
        """(seconds since the previous step, ETA seconds, emit an event) for `step` of `total`."""
        now = self._clock()
        took, self._last_step_at = now - self._last_step_at, now
        if self._first_step is None:
            self._first_step = step - 1
        done = max(1, step - self._first_step)
        eta = (now - self.started) / done * max(0, total - step)
        emit = now - self._last_event_at >= self._event_interval or step >= total
        if emit:
            self._last_event_at = now
        return took, eta, emit

    def elapsed(self) -> float:
        return self._clock() - self.started


class JobCallbacks:
    """The TrainerCallbacks the worker hands to `run_training` for one attempt."""

    def __init__(
        self, job: JobRecord, worker_id: str, store: JobStore, registry: Registry,
        lease: LeaseKeeper, metrics: WorkerMetrics | None, shutdown_grace: float = 30.0,
        event_interval: float = PROGRESS_EVENT_INTERVAL,
    ) -> None:
        self._job = job
        self._pace = StepPace(event_interval)
        self._shutdown_grace = shutdown_grace
        self._shutdown_seen: tuple[float, int] | None = None
        self._worker_id = worker_id
        self._store = store
        self._registry = registry
        self._lease = lease
        self._metrics = metrics
        self.last_step = 0
        self.last_loss: float | None = None
        self.checkpoint_steps: list[int] = []

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        took, eta, emit = self._pace.step(step, total)
        if self._metrics is not None:
            self._metrics.step_seconds.labels(self._job.method).observe(took)
            self._metrics.record_usage(self._job.tenant, took, last_step=step >= total)
        self.last_step, self.last_loss = step, loss
        try:
            status = self._store.record_progress(
                self._job.id, self._worker_id, step=step, loss=loss, learning_rate=lr,
                eta_seconds=eta, emit_event=emit,
            )
        except Exception:  # a database blip must not kill training; the lease keeper decides
            log.warning("progress update failed", exc_info=True, extra={"job_id": self._job.id})
            return
        self._lease.observe(status)

    def should_stop(self) -> bool:
        """Cancel or lost lease: stop now. Shutdown: stop once the next checkpoint is saved
        (so the next worker loses no work), or when the shutdown grace period runs out."""
        if self._lease.lost.is_set() or self._lease.cancelled.is_set():
            return True
        if not self._lease.shutdown.is_set():
            return False
        now = time.monotonic()
        if self._shutdown_seen is None:
            self._shutdown_seen = (now, len(self.checkpoint_steps))
            log.info("shutdown requested: training on until the next checkpoint",
                     extra={"job_id": self._job.id})
        since, saved_before = self._shutdown_seen
        return len(self.checkpoint_steps) > saved_before or now - since > self._shutdown_grace

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        if self._lease.lost.is_set():
            return  # the job belongs to someone else now; do not write over its checkpoints
        files = {p.relative_to(state_dir).as_posix(): p for p in sorted(state_dir.rglob("*")) if p.is_file()}
        self._registry.checkpoints.put(self._job.tenant, self._job.id, step, files)
        self.checkpoint_steps.append(step)
        log.info("checkpoint saved", extra={"job_id": self._job.id, "step": step})

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None,
                      held_out: dict[str, Any] | None = None) -> None:
        previews = [ValidationPreview(step, prompt, png) for prompt, png in images]
        try:
            status = self._store.record_validation(self._job.id, self._worker_id, previews, loss, held_out)
            self._lease.observe(status)
        except Exception:
            log.warning("validation event failed", exc_info=True, extra={"job_id": self._job.id})

    @property
    def wall_seconds(self) -> float:
        return self._pace.elapsed()
