"""The inference engine: requests in, PNGs out; owns the tiers, the batcher and the device thread.

Flow of `generate`: admit (or RESOURCE_EXHAUSTED at once) -> base model (loaded once) ->
resolve each adapter reference and check it belongs to this base model (its model family
first: an SDXL adapter on a Flux base is FAILED_PRECONDITION naming both) -> parsed payloads
through the disk and host tiers (off the event loop, single flight) -> batcher -> device thread
(attach missing adapters, merge the mix, one pipeline call) -> PNG encoding off the device
thread. Every pipeline mutation and call happens on one dedicated thread, so the device runs
one thing at a time and needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import io
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from PIL import Image as PILImage
from prometheus_client import CollectorRegistry

from services.common.config import Settings
from services.common.errors import AtelierError, Cancelled, FailedPrecondition, InvalidInput, PermissionDenied
from services.common.quotas import TenantRateLimiter
from services.common.usage import UsageLedger, device_label
from services.families import SD1, mismatch
from services.inference.abort import AbortGuard
from services.inference.adapters import AdapterKey, DiskTier, HostTier, Resolver, open_adapter_tiers
from services.inference.batcher import WorkItem
from services.inference.cache import TierStatus
from services.inference.continuous import ContinuousBatcher
from services.inference.device import AdapterUse, DeviceState
from services.inference.device_thread import DeviceThread, DeviceWatchdog, Report
from services.inference.merge_methods import LINEAR
from services.inference.metrics import InferenceMetrics
from services.inference.pipelines import BaseModel, PipelinePool
from services.inference.runner import BatchAborted, BatchOutput, Job, Runner, image_seeds
from services.inference.safety import SafetyHook
from services.inference.step_loop import Embeddings, Finished, Stepper, streamable, touches_text
from services.inference.types import (
    AdapterSpec,
    GenerationRequest,
    GenerationResult,
    Image,
    Progress,
    ResolvedAdapterInfo,
    Timings,
)
from services.inference.validation import check_latent_area, check_size_multiple, with_family_defaults
from services.registry.manifests import AdapterManifest
from services.registry.registry import Registry

T = TypeVar("T")
log = logging.getLogger(__name__)
TIERS = ("disk", "host", "device")


@dataclass(frozen=True)
class ItemOutput:
    """One request's share of a batch's output."""

    pixels: list[np.ndarray]
    attach_ms: float
    denoise_ms: float
    batch_size: int
    device_seconds: float = 0.0  # this request's share of the batch's device time (accounting)


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class InferenceEngine:
    """See the module docstring. Create it inside the event loop that will call it."""

    def __init__(self, settings: Settings, registry: Registry, metrics_registry: CollectorRegistry | None = None,
                 *, exact_batching: bool | None = None, ref_ttl_seconds: float | None = None,
                 io_threads: int = 8, usage: UsageLedger | None = None) -> None:
        self.settings = settings
        self.registry = registry
        metrics_registry = metrics_registry or CollectorRegistry()
        self.metrics = InferenceMetrics(metrics_registry)
        self.usage = usage or UsageLedger.from_settings(settings, metrics_registry)
        self.usage_device = device_label(settings.inference_device)
        self.pipelines = PipelinePool(settings, registry)
        self.resolver = Resolver(registry, settings.adapter_ref_ttl_seconds if ref_ttl_seconds is None
                                 else ref_ttl_seconds)
        self.disk: DiskTier
        self.host: HostTier
        self.disk, self.host = open_adapter_tiers(settings, registry, self.metrics)
        self.device_state = DeviceState(settings, self.metrics, self.host.dreambooth_files)
        self.runner = Runner(self.device_state, self.metrics,
                             exact=settings.exact_batching if exact_batching is None else exact_batching,
                             guard=AbortGuard(settings.attention_chunk_elements))
        self.watchdog: DeviceWatchdog | None = None
        self.safety = SafetyHook.from_settings(settings)  # a bad setting fails here, at start-up
        self._device = DeviceThread("atelier-device")
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="atelier-inference-io")
        self.stepper = Stepper(self.device_state, self.metrics, self.runner.guard, self.runner.exact)
        self.batcher = ContinuousBatcher(
            settings.queue_size, settings.max_batch_size, settings.batch_wait_ms / 1000, self._execute,
            self.metrics, self._admit_rows, self._step_rows, max_adapters=settings.device_cache_max_adapters)
        self.rate_limit = TenantRateLimiter(settings.quota_generate_rps, settings.quota_generate_burst,
                                            "Generate requests")
        self._alias_watch: asyncio.Task[None] | None = None
        if settings.adapter_ref_ttl_seconds > 0:
            with contextlib.suppress(RuntimeError):  # no running loop: no watcher (scripts)
                self._alias_watch = asyncio.get_running_loop().create_task(
                    self._watch_aliases(settings.adapter_ref_ttl_seconds), name="atelier-alias-watch")

    # --- threads ----------------------------------------------------------------------
    async def on_device(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._device, fn, *args)

    async def on_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the I/O pool in a copy of the caller's context, so the RPC's deadline
        (services.common.deadlines) bounds the registry calls it makes."""
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._io, ctx.run, fn, *args)

    def watch_device(self, report: Report) -> None:
        """Start the stuck-device watchdog (server start-up); `report(serving)` updates health."""
        if self.settings.device_stuck_seconds > 0 and self.watchdog is None:
            self.watchdog = DeviceWatchdog(self.runner.guard, self.settings.device_stuck_seconds, report)
            self.watchdog.start()

    async def close(self, device_timeout: float = 5.0) -> None:
        """Abort the device's work, fail what waits, then wait up to `device_timeout` s for the
        device thread (a daemon: if a kernel never returns, the process can still exit)."""
        self.runner.guard.stop()
        if self._alias_watch is not None:
            self._alias_watch.cancel()
        if self.watchdog is not None:
            await self.watchdog.close()
        await self.batcher.close()
        self._device.shutdown(wait=False, cancel_futures=True)
        if not await asyncio.to_thread(self._device.join, device_timeout):
            log.warning("device thread still busy at shutdown", extra={"waited_seconds": device_timeout})
        self._io.shutdown(wait=False, cancel_futures=True)

    # --- generation -------------------------------------------------------------------
    async def generate(self, tenant: str, request: GenerationRequest, deadline: float | None = None,
                       progress: Callable[[Progress], None] | None = None) -> GenerationResult:
        """Run one request; `deadline` is a time.monotonic() value, `progress` is thread-safe."""
        started = time.perf_counter()
        self.rate_limit.acquire(tenant)  # QuotaExceeded before taking a queue slot
        self.batcher.admit()
        submitted = False
        try:
            if progress:
                progress(Progress("loading_adapters"))
            base = await self.base_model(request.base_model)
            request = with_family_defaults(request, base.part, base.family.title)
            manifests = await self._resolve(tenant, request.adapters, base)
            width, height = request.width or base.default_size, request.height or base.default_size
            check_latent_area(request, width, height, int(base.pipe.vae_scale_factor),
                              self.settings.max_latent_pixels, request.base_model)
            check_size_multiple(request, width, height, base.part.size_multiple(base.pipe), request.base_model)
            uses, embeddings = await self._load_and_encode(manifests, request, base)
            job = Job(request, base, uses, width, height, embeddings)
            loop = asyncio.get_running_loop()
            item = WorkItem(self._batch_key(job), job, loop.create_future(), deadline, progress, tenant=tenant,
                            adapters=frozenset(u.key for u in uses if u.kind != "DREAMBOOTH"),
                            stream=self.settings.continuous_batching and streamable(job))
            load_ms = (time.perf_counter() - started) * 1000
            if progress:
                progress(Progress("queued", 0, request.steps, load_ms))
            self.batcher.submit(item)
            submitted = True
            try:
                output: ItemOutput = await item.future
            except asyncio.CancelledError:
                item.cancelled.set()
                self.batcher.withdraw(item)
                raise
        finally:
            if not submitted:
                self.batcher.release()
        self.usage.record(tenant, "generation", self.usage_device, output.device_seconds)
        return await self._finish(item, output, manifests, request, base, started, load_ms)

    async def _finish(self, item: WorkItem, output: ItemOutput, manifests: Sequence[AdapterManifest],
                      request: GenerationRequest, base: BaseModel, started: float,
                      load_ms: float) -> GenerationResult:
        pixels = output.pixels
        if item.progress:
            item.progress(Progress("encoding", request.steps, request.steps, (time.perf_counter() - started) * 1000))
        screened = (await self.on_io(self.safety.screen_all, pixels) if self.safety.enabled
                    else [(p, False) for p in pixels])
        t0 = time.perf_counter()
        pngs = await self.on_io(lambda: [encode_png(p) for p, _flagged in screened])
        encode_ms = (time.perf_counter() - t0) * 1000
        job: Job = item.payload
        images = [Image(png, seed, job.width, job.height, flagged)
                  for png, seed, (_p, flagged) in zip(pngs, image_seeds(request), screened, strict=True)]
        self.metrics.safety_flagged.inc(sum(image.safety_flagged for image in images))
        self.metrics.images.inc(len(images))
        timings = Timings(
            queue_ms=max(0.0, (item.started_at - item.enqueued_at) * 1000),
            adapter_load_ms=load_ms + output.attach_ms,
            denoise_ms=output.denoise_ms,
            encode_ms=encode_ms,
            total_ms=(time.perf_counter() - started) * 1000,
        )
        adapters = [ResolvedAdapterInfo(m.name, m.version, m.kind, m.manifest_digest, spec.weight)
                    for m, spec in zip(manifests, request.adapters, strict=True)]
        return GenerationResult(images, adapters, base.digest, output.batch_size, timings)

    async def _execute(self, batch: list[WorkItem]) -> None:
        """The batcher's executor: one pipeline call on the device thread, results to futures."""
        try:
            output: BatchOutput = await self.on_device(self.runner.run, batch)
        except BatchAborted:
            for item in batch:
                item.fail(item.why_dead() if item.dead() else Cancelled("the server is shutting down"))
            return
        except Exception as exc:
            for item in batch:
                item.fail(exc)
            return
        device_seconds = (output.attach_ms + output.denoise_ms) / 1000  # split by images: each pays its share
        images = sum(len(p) for p in output.images) or 1
        errors = output.errors or [None] * len(batch)
        for pixels, item, error in zip(output.images, batch, errors, strict=True):
            if error is not None:
                item.fail(error)
            elif not item.future.done():
                item.future.set_result(ItemOutput(pixels, output.attach_ms, output.denoise_ms, len(batch),
                                                  device_seconds * len(pixels) / images))

    async def _admit_rows(self, items: list[WorkItem]) -> list[BaseException | None]:
        return await self.on_device(self.stepper.admit, items)

    async def _step_rows(self, items: list[WorkItem]) -> list[tuple[WorkItem, ItemOutput]]:
        """One step of the continuous batch (continuous.py); finished requests' outputs."""
        done: list[Finished] = await self.on_device(self.stepper.step, items)
        return [(f.item, ItemOutput(f.pixels, f.attach_ms, f.denoise_ms, f.batch_size, f.device_seconds))
                for f in done]

    async def _load_and_encode(self, manifests: Sequence[AdapterManifest], request: GenerationRequest,
                               base: BaseModel) -> tuple[tuple[AdapterUse, ...], Embeddings | None]:
        """Payloads through the tiers; while a cold one downloads, the prompt is encoded with the
        base text encoders (issue 13). Kept only when no adapter changes the text encoding (TI, a
        LoRA with text-encoder layers); else the step loop encodes after the fetch."""
        cold = any(self.host.cached(m) is None for m in manifests)
        early = (self.settings.continuous_batching and cold and base.family.name == SD1.name
                 and all(m.kind == "LORA" for m in manifests))
        encoding = asyncio.ensure_future(self.on_device(self.stepper.encode_base, base, request)) if early else None
        try:
            uses = await self._load(manifests, request.adapters)
        except BaseException:
            if encoding is not None:
                encoding.cancel()
                with contextlib.suppress(BaseException):
                    await encoding
            raise
        if encoding is None:
            return uses, None
        embeddings = await encoding
        return uses, None if any(touches_text(u.payload) for u in uses) else embeddings

    @staticmethod
    def _batch_key(job: Job) -> tuple[Any, ...]:
        """LINEAR LoRA mixes and TI batch together (per-sample deltas, per-request prompts: see
        runner.py); a DreamBooth adapter swaps weights, and a TIES/DARE mix is full rank, so
        those batch only with requests for the same weights / the same mix."""
        req = job.request
        adapters = tuple((u.key, u.kind, u.weight if u.kind == "LORA" else 1.0) for u in job.uses)
        if req.merge.normalised().method == LINEAR:
            adapters = tuple((u.key, u.kind, 1.0) for u in job.uses if u.kind == "DREAMBOOTH")
        return (job.base.name, adapters, job.width, job.height, req.steps, req.scheduler, req.guidance_scale,
                req.merge, req.mode, req.strength)

    # --- adapters ---------------------------------------------------------------------
    async def base_model(self, name: str) -> BaseModel:
        loaded = self.pipelines.peek(name)
        if loaded is not None:
            return loaded
        return await self.on_device(self.pipelines.get, name)

    async def _resolve(self, tenant: str, specs: Sequence[AdapterSpec], base: BaseModel,
                       for_device: bool = True) -> list[AdapterManifest]:
        async def one(spec: AdapterSpec) -> AdapterManifest:
            if spec.ref.tenant != tenant:  # the edge parses refs in the caller's tenant: never cross it
                raise PermissionDenied(f"{spec.field}: a reference of another tenant")
            manifest = await self.on_io(self.resolver.resolve, spec.ref)
            family = manifest.base_family
            if not family and manifest.base_model != base.model_name:  # legacy: ask its base model
                family = await self.on_io(self._recorded_family, manifest.base_model)
            if family and family != base.family.name:
                raise FailedPrecondition(f"adapter {manifest.ref}: {mismatch(family, base.family.name).message}",
                                         field_name=f"{spec.field}.ref")
            self._check_base(manifest, base, spec)
            return manifest

        manifests = list(await asyncio.gather(*(one(s) for s in specs)))
        dreambooth = [i for i, m in enumerate(manifests) if m.kind == "DREAMBOOTH"]
        if len(dreambooth) > 1:
            raise InvalidInput(specs[dreambooth[1]].field, "at most one DREAMBOOTH adapter per request")
        attached = sum(1 for m in manifests if m.kind != "DREAMBOOTH")
        if for_device and attached > self.settings.device_cache_max_adapters:
            raise FailedPrecondition(
                f"{attached} LoRA/TI adapters requested; this server attaches at most "
                f"{self.settings.device_cache_max_adapters} at once", field_name="spec.adapters")
        return manifests

    def _recorded_family(self, base_model: str) -> str:
        """The family a registry base model's manifest records ("" when unknown or unreadable:
        the name/digest check that follows still refuses a foreign base)."""
        try:
            return self.registry.base_models.get(base_model).family
        except AtelierError:
            return ""

    @staticmethod
    def _check_base(manifest: AdapterManifest, base: BaseModel, spec: AdapterSpec) -> None:
        if manifest.base_model != base.model_name or (manifest.base_model_digest and
                                                manifest.base_model_digest != base.digest):
            raise FailedPrecondition(
                f"adapter {manifest.ref} was trained for base model {manifest.base_model!r} "
                f"({manifest.base_model_digest[:12] or 'no digest'}), not {base.name!r} ({base.digest[:12]})",
                field_name=f"{spec.field}.ref",
            )

    async def _load(self, manifests: Sequence[AdapterManifest],
                    specs: Sequence[AdapterSpec]) -> tuple[AdapterUse, ...]:
        async def one(manifest: AdapterManifest, spec: AdapterSpec) -> AdapterUse:
            payload = self.host.cached(manifest)
            if payload is None:
                payload = await self.on_io(self.host.load, manifest)
            return AdapterUse(AdapterKey.of(manifest), manifest.kind, spec.weight, payload)

        return tuple(await asyncio.gather(*(one(m, s) for m, s in zip(manifests, specs, strict=True))))

    async def _watch_aliases(self, interval: float) -> None:
        """Every ref TTL, re-resolve the aliases this replica resolved; when one moved and the
        host tier holds its old version, fetch the new version's payload now, so the first
        request after the move does not pay the cold load (issue 13)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.on_io(self.prefetch_moved_aliases)
            except Exception:  # an outage or a bad new version: the request path will report it
                log.warning("alias prefetch failed", exc_info=True)

    def prefetch_moved_aliases(self) -> int:
        """I/O pool: load moved aliases' new versions into the host tier; returns how many."""
        count = 0
        for old, new in self.resolver.moved_aliases():
            held = self.host.cache.peek(AdapterKey.of(old)) is not None
            if held and self.host.cache.peek(AdapterKey.of(new)) is None:
                self.host.load(new)
                count += 1
        return count

    # --- ops --------------------------------------------------------------------------
    async def preload(self, tenant: str, base_model: str, specs: Sequence[AdapterSpec],
                      tier: str = "device", pin: bool = False) -> list[ResolvedAdapterInfo]:
        """Bring adapters into `tier` (and every tier below it); `pin`: and keep them attached for good."""
        base = await self.base_model(base_model)
        manifests = await self._resolve(tenant, specs, base, for_device=tier == "device")
        if tier == "disk":
            for manifest in manifests:
                await self.on_io(lambda m=manifest: [self.disk.fetch(f, m.tenant) for f in m.files])
        else:
            uses = await self._load(manifests, specs)
            if tier == "device":
                await self.on_device(self.device_state.pin if pin else self.device_state.prepare, base, uses)
        return [ResolvedAdapterInfo(m.name, m.version, m.kind, m.manifest_digest, s.weight)
                for m, s in zip(manifests, specs, strict=True)]

    def tier_status(self, tenant: str | None = None) -> list[TierStatus]:
        """disk, host, device. Totals are global aggregates; every tier lists only the entries
        `tenant` itself used, with its own idle time: a blob digest on disk is shared by content,
        so listing it would tell one tenant when another uses the same bytes. None: everything."""
        return [
            self.disk.cache.status(tenant),
            self.host.cache.status(tenant),
            self.device_state.adapters.status(tenant, lambda k: f"{k[1]} on {k[0]}"),
        ]
