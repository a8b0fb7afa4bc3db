"""The training worker: claim a job, train it, publish exactly one adapter version.

Loop: reap expired leases -> claim the oldest QUEUED job -> materialize the base model
(cached by digest) -> fetch the dataset -> fetch the latest checkpoint (resume) -> run the
trainer with callbacks (progress, heartbeat, cancel/lease checks, checkpoints to the
registry) -> fence -> publish -> alias -> SUCCEEDED.

Exactly-once publish. `prepare_publish` right before the upload re-checks ownership and
cancel and renews the lease; the registry's per-job publish marker (see
services/registry/allocation.py) makes `registry.adapters.publish(source_job_id=...)` idempotent, so
any number of publishers of one job (takeover, retry after SIGKILL, a stalled worker
waking up) end with the same single version; a later attempt that finds the job's version
already published adopts it without training; `complete` is fenced by ownership.
See docs/architecture.md ("Training jobs").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from services.common.config import Settings
from services.common.errors import DataLoss, FailedPrecondition, InvalidInput, NotFound
from services.families import detect as detect_family
from services.registry.manifests import AdapterManifest, BaseModelManifest
from services.registry.registry import Registry
from services.registry.safety import first_non_finite
from services.training.convert import config_from_stored_spec
from services.training.db_retry import retry_transient
from services.training.job_run import JobCallbacks, LeaseKeeper
from services.training.jobstore import JobStore
from services.training.metrics import WorkerMetrics
from services.training.records import JobRecord
from services.training.trainers import (
    TrainConfig,
    TrainImage,
    TrainResult,
    validate_against_tokenizer,
    validate_config,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that another attempt cannot fix: the job FAILS at once instead of retrying.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (InvalidInput, NotFound, FailedPrecondition, DataLoss)
Trainer = Callable[..., TrainResult]


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def config_of(job: JobRecord) -> TrainConfig:
    """The job's resolved config (stored at create, so every attempt uses the same seed)."""
    if job.config:
        return TrainConfig(**job.config)
    return config_from_stored_spec(job.spec)  # a row from before the config was stored


def check_tokenizer(config: TrainConfig, base_dir: Path) -> None:
    """TI checks that need the base model's tokenizer (new placeholder, one-token initializer)."""
    if config.method != "TEXTUAL_INVERSION":
        return
    from transformers import CLIPTokenizer

    validate_against_tokenizer(config, CLIPTokenizer.from_pretrained(base_dir / "tokenizer"))


def check_finite_outputs(files: dict[str, Path]) -> None:
    """A diverged run (NaN/inf weights) fails for good instead of publishing black images."""
    for relative, path in sorted(files.items()):
        if relative.endswith(".safetensors") and (name := first_non_finite(path)) is not None:
            raise FailedPrecondition(f"training diverged: non-finite weights in {name!r} ({relative}); "
                                     "nothing was published (lower the learning rate)")


def family_name(base: BaseModelManifest, base_dir: Path) -> str:
    """The family the adapter is trained for: the base manifest's record, else detected from
    the materialized folder (a base imported before families were recorded)."""
    if base.family:
        return base.family
    try:
        return detect_family(base_dir).name
    except FailedPrecondition:  # only a stand-in trainer gets this far on such a folder
        return ""


class Worker:
    """Runs jobs one at a time until `shutdown` is set."""

    def __init__(
        self, settings: Settings, store: JobStore, registry: Registry, *,
        worker_id: str = "", metrics: WorkerMetrics | None = None, trainer: Trainer | None = None,
    ) -> None:
        if trainer is None:  # the real trainer imports torch: only processes that train load it
            from services.training.trainers import engine

            trainer = engine.run_training
        self.settings = settings
        self.store = store
        self.registry = registry
        self.worker_id = worker_id or settings.worker_id or default_worker_id()
        self.metrics = metrics
        self._trainer = trainer
        self.shutdown = threading.Event()
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", self.worker_id)
        self._work_root = settings.data_dir / "worker" / "jobs" / safe_id
        self._model_cache = settings.data_dir / "worker" / "base-models"

    def run_forever(self) -> None:
        """Poll for work until `shutdown` is set; a job in progress is stopped and released."""
        log.info("worker started", extra={"worker_id": self.worker_id})
        while not self.shutdown.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the loop itself must survive a database outage
                log.exception("worker loop error")
                ran = False
            if not ran:
                self.shutdown.wait(self.settings.worker_poll_seconds)
        log.info("worker stopped", extra={"worker_id": self.worker_id})

    def run_once(self) -> bool:
        """Reap expired leases, claim one job and run it; False when the queue was empty."""
        for job_id, state in self.store.reap_expired():
            log.warning("reaped expired lease", extra={"job_id": job_id, "state": state})
        job = self.store.claim(self.worker_id)
        if job is None:
            return False
        log.info("claimed job", extra={"job_id": job.id, "attempt": job.attempts})
        self.execute(job)
        return True

    def execute(self, job: JobRecord) -> None:
        work_dir = self._work_root / job.id
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)
        lease = LeaseKeeper(self.store, job.id, self.worker_id, self.settings.heartbeat_seconds,
                            self.metrics, self.shutdown)
        with lease:
            callbacks = JobCallbacks(job, self.worker_id, self.store, self.registry, lease, self.metrics,
                                     shutdown_grace=self.settings.shutdown_grace_seconds,
                                     event_interval=self.settings.progress_event_interval_seconds)
            try:
                self._attempt(job, lease, callbacks, work_dir)
            except PERMANENT_ERRORS as exc:
                self._end_with_error(job, lease, str(exc), retryable=False)
            except Exception as exc:
                log.exception("job attempt failed", extra={"job_id": job.id})
                self._end_with_error(job, lease, f"{type(exc).__name__}: {exc}", retryable=True)
            finally:
                shutil.rmtree(work_dir, ignore_errors=True)
                if self.metrics is not None:  # an attempt's usage is in the job store once it ends
                    self.metrics.usage.flush()

    # --- one attempt --------------------------------------------------------------------
    def _attempt(self, job: JobRecord, lease: LeaseKeeper, callbacks: JobCallbacks, work_dir: Path) -> None:
        if job.attempts > 1 and (adopted := self._find_published(job)) is not None:
            self._complete(job, lease, adopted.version, dict(adopted.metrics), "adopted a version "
                           "an earlier attempt published")
            return
        config = config_of(job)
        validate_config(config, self.settings)
        base = self.registry.base_models.get(config.base_model)
        base_dir = self.registry.base_models.materialize(base, self._model_cache)  # the bytes `base` names
        check_tokenizer(config, base_dir)
        images = self._fetch_images(job.tenant, config.dataset_id, work_dir / "data")
        class_images = (self._fetch_images(job.tenant, config.class_dataset_id, work_dir / "class-data")
                        if config.with_prior_preservation and config.class_dataset_id else None)
        resume_dir, resumed = self._fetch_checkpoint(job, work_dir / "resume")
        log.info("inputs ready; training",
                 extra={"job_id": job.id, "prepare_seconds": round(callbacks.wall_seconds, 3)})
        lease.observe(self._fenced("start_attempt", lambda: self.store.start_attempt(
            job.id, self.worker_id, resumed_from_step=resumed, total_steps=config.max_train_steps,
            config=config.model_dump(mode="json"),
        )))
        if lease.should_stop:
            self._stopped(job, lease)
            return
        result = self._trainer(
            config, base_model_dir=base_dir, images=images, work_dir=work_dir / "train",
            callbacks=callbacks, resume_dir=resume_dir, device=self.settings.training_device,
            class_images=class_images,
        )
        if result.stopped or lease.lost.is_set() or lease.cancelled.is_set():
            self._stopped(job, lease)
            return
        check_finite_outputs(result.files)
        self._publish(job, lease, config, base, base_dir, result, callbacks.wall_seconds, resumed)

    def _fetch_images(self, tenant: str, dataset_id: str, dest: Path) -> list[TrainImage]:
        manifest = self.registry.datasets.get(tenant, dataset_id)
        paths = self.registry.datasets.fetch_images(manifest, dest)
        captions = [record.caption for record in sorted(manifest.images, key=lambda r: r.index)]
        return [TrainImage(path, caption) for path, caption in zip(paths, captions, strict=True)]

    def _fetch_checkpoint(self, job: JobRecord, dest: Path) -> tuple[Path | None, int]:
        checkpoint = self.registry.checkpoints.latest(job.tenant, job.id)
        if checkpoint is None:
            return None, 0
        self.registry.checkpoints.fetch(checkpoint, dest)
        log.info("resuming from checkpoint", extra={"job_id": job.id, "step": checkpoint.step})
        return dest, checkpoint.step

    def _find_published(self, job: JobRecord) -> AdapterManifest | None:
        """The version this job already published: by its marker, else (versions written
        before markers existed) a version naming this job as its source."""
        if (found := self.registry.adapters.job_version(job.tenant, job.output_name, job.id)) is not None:
            return found
        token = ""
        while True:
            try:
                versions, token = self.registry.adapters.list_versions(job.tenant, job.output_name, 100, token)
            except NotFound:
                return None
            for manifest in versions:
                if manifest.source_job_id == job.id:
                    return manifest
            if not token:
                return None

    def _publish(
        self, job: JobRecord, lease: LeaseKeeper, config: TrainConfig, base: BaseModelManifest, base_dir: Path,
        result: TrainResult, wall_seconds: float, resumed: int,
    ) -> None:
        status = self._fenced("prepare_publish", lambda: self.store.prepare_publish(job.id, self.worker_id))
        lease.observe(status)
        if not status.owned or status.cancel_requested:
            self._stopped(job, lease)
            return
        metrics = {**result.metrics, "steps": float(result.steps), "wall_time_seconds": wall_seconds,
                   "resumed_from_step": float(resumed)}
        training_config: dict[str, Any] = {**config.model_dump(mode="json"), **result.config}
        manifest = self.registry.adapters.publish(
            job.tenant, config.output_name, kind=config.method, base_model=base.name,
            base_model_digest=base.digest, base_family=family_name(base, base_dir), files=result.files,
            trigger_tokens=result.trigger_tokens,
            training_config=training_config, metrics=metrics, source_job_id=job.id,
            description=config.description,
        )
        metrics = dict(manifest.metrics)  # ours, or those of the publisher of this job that won
        message = f"published {manifest.name} version {manifest.version}"
        if config.output_alias:
            try:
                self.registry.adapters.set_alias(job.tenant, manifest.name, config.output_alias, manifest.version)
                message += f" (alias {config.output_alias})"
            except Exception as exc:  # the version is published; a failed alias must not undo that
                log.warning("setting alias failed", exc_info=True, extra={"job_id": job.id})
                message += f"; setting alias {config.output_alias!r} failed: {exc}"
        self._complete(job, lease, manifest.version, metrics, message)

    def _complete(self, job: JobRecord, lease: LeaseKeeper, version: int, metrics: dict[str, float],
                  message: str) -> None:
        if self._fenced("complete", lambda: self.store.complete(job.id, self.worker_id, output_version=version,
                                                               metrics=metrics, message=message)):
            self._count("succeeded")
            self._drop_checkpoints(job)
            log.info(message, extra={"job_id": job.id})
        else:
            # Lost the lease after publishing: the next owner adopts this version (source_job_id).
            lease.lost.set()
            log.warning("published but lost the lease before recording it", extra={"job_id": job.id})

    # --- endings ------------------------------------------------------------------------
    def _stopped(self, job: JobRecord, lease: LeaseKeeper) -> None:
        if lease.lost.is_set():
            self._count("lost")
            log.warning("lost the lease; stopping without publishing", extra={"job_id": job.id})
        elif lease.cancelled.is_set():
            if self.store.finish_cancelled(job.id, self.worker_id):
                self._drop_checkpoints(job)
            self._count("cancelled")
        elif lease.shutdown.is_set():
            self.store.release(job.id, self.worker_id, "worker shutting down")
            self._count("released")

    def _end_with_error(self, job: JobRecord, lease: LeaseKeeper, error: str, *, retryable: bool) -> None:
        if lease.lost.is_set() or lease.cancelled.is_set() or (retryable and lease.shutdown.is_set()):
            self._stopped(job, lease)
            return
        try:
            state = self._fenced("fail", lambda: self.store.fail(job.id, self.worker_id, error, retryable=retryable))
        except Exception:
            log.exception("could not record the failure; the lease will expire", extra={"job_id": job.id})
            return
        self._count("failed" if state == "FAILED" else "retry")
        if state in ("FAILED", "CANCELLED"):
            self._drop_checkpoints(job)

    def _fenced(self, what: str, call: Callable[[], T]) -> T:
        """A fenced job-store write, retried through a short database outage (db_retry.py);
        the lease bounds the wait, since past it another worker may own the job."""
        return retry_transient(call, budget_s=self.settings.lease_seconds, what=what)

    def _drop_checkpoints(self, job: JobRecord) -> None:
        try:
            self.registry.checkpoints.delete_all(job.tenant, job.id)
        except Exception:  # garbage only; never fail a finished job over it
            log.warning("deleting checkpoints failed", exc_info=True, extra={"job_id": job.id})

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.jobs_finished.labels(outcome).inc()
