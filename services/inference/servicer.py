"""InferenceService over gRPC: validate, call the engine, convert. Errors are typed domain errors
that the server's error-mapping interceptor turns into status codes with details.

The caller's deadline travels into the engine (requests past it are dropped from the queue or
stopped between denoising steps); a client that cancels cancels the handler, which the engine
sees the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from atelier_api.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.common.auth import current_tenant
from services.common.errors import Violations
from services.common.server import RunningServer, ServiceBinding
from services.inference.cache import TierStatus
from services.inference.engine import InferenceEngine
from services.inference.types import GenerationRequest, GenerationResult, Progress
from services.inference.validation import check_refs, parse_spec
from services.inference.warm import warm_start

SERVICE_NAME = "atelier.v1.InferenceService"
KINDS = {
    "LORA": common_pb2.ADAPTER_KIND_LORA,
    "TEXTUAL_INVERSION": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
    "DREAMBOOTH": common_pb2.ADAPTER_KIND_DREAMBOOTH,
}
TIER_KINDS = {
    "disk": inference_pb2.CACHE_TIER_KIND_DISK,
    "host": inference_pb2.CACHE_TIER_KIND_HOST,
    "device": inference_pb2.CACHE_TIER_KIND_DEVICE,
}
TIER_NAMES = {v: k for k, v in TIER_KINDS.items()}
MAX_PRELOAD_BELOW_DEVICE = 1024  # adapters per PreloadAdapters call into the disk or host tier


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def result_to_proto(result: GenerationResult) -> inference_pb2.GenerateResponse:
    t = result.timings
    return inference_pb2.GenerateResponse(
        images=[inference_pb2.GeneratedImage(png=i.png, seed=i.seed, width=i.width, height=i.height,
                                             safety_flagged=i.safety_flagged)
                for i in result.images],
        adapters=[inference_pb2.ResolvedAdapter(name=a.name, version=a.version, kind=KINDS[a.kind],
                                                manifest_digest=a.manifest_digest, weight=a.weight)
                  for a in result.adapters],
        timings=inference_pb2.Timings(queue_ms=t.queue_ms, adapter_load_ms=t.adapter_load_ms,
                                      denoise_ms=t.denoise_ms, encode_ms=t.encode_ms, total_ms=t.total_ms),
        base_model_digest=result.base_model_digest,
        batch_size=result.batch_size,
    )


def progress_to_proto(progress: Progress) -> inference_pb2.GenerateStreamResponse:
    return inference_pb2.GenerateStreamResponse(progress=inference_pb2.GenerationProgress(
        step=progress.step, total_steps=progress.total_steps, elapsed_ms=progress.elapsed_ms,
        stage=progress.stage))


def tier_to_proto(status: TierStatus) -> inference_pb2.CacheTierStatus:
    return inference_pb2.CacheTierStatus(
        tier=TIER_KINDS[status.name], capacity_bytes=status.capacity_bytes, used_bytes=status.used_bytes,
        max_entries=status.max_entries, hits=status.hits, misses=status.misses, evictions=status.evictions,
        entries=[inference_pb2.CacheEntry(key=e.key, bytes=e.nbytes, idle_seconds=e.idle_seconds,
                                          pinned=e.key in status.pinned)
                 for e in status.entries],
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Thin: validation in validation.py, work in the engine."""

    def __init__(self, engine: InferenceEngine) -> None:
        self._engine = engine
        self._settings = engine.settings

    async def _parse(self, spec: inference_pb2.GenerationSpec, tenant: str) -> GenerationRequest:
        """Specs carrying images are decoded on the I/O pool, not on the event loop."""
        if spec.init_image or spec.mask_image:
            return await self._engine.on_io(parse_spec, spec, self._settings, tenant)
        return parse_spec(spec, self._settings, tenant)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        tenant = current_tenant()
        spec = await self._parse(request.spec, tenant)
        result = await self._engine.generate(tenant, spec, deadline=_deadline(context))
        return result_to_proto(result)

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[inference_pb2.GenerateStreamResponse]:
        tenant = current_tenant()
        spec = await self._parse(request.spec, tenant)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Progress] = asyncio.Queue()

        def progress(event: Progress) -> None:  # called from the device thread too
            loop.call_soon_threadsafe(events.put_nowait, event)

        task = asyncio.ensure_future(
            self._engine.generate(tenant, spec, deadline=_deadline(context), progress=progress))
        getter: asyncio.Future[Progress] | None = None
        try:
            while not task.done():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield progress_to_proto(getter.result())
            while not events.empty():
                yield progress_to_proto(events.get_nowait())
            yield inference_pb2.GenerateStreamResponse(result=result_to_proto(task.result()))
        finally:
            for pending in (getter, task):
                if pending is not None and not pending.done():
                    pending.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await pending

    async def PreloadAdapters(self, request: inference_pb2.PreloadAdaptersRequest,
                              context: grpc.aio.ServicerContext) -> inference_pb2.PreloadAdaptersResponse:
        errors = Violations()
        if not request.base_model:
            errors.add("base_model", "must not be empty")
        tier = TIER_NAMES.get(request.tier, "device") if request.tier else "device"
        limit = self._settings.device_cache_max_adapters if tier == "device" else MAX_PRELOAD_BELOW_DEVICE
        tenant = current_tenant()
        specs = check_refs(tenant, list(request.adapters), [1.0] * len(request.adapters), "adapters", "", limit,
                           errors)
        errors.raise_if_any()
        started = time.perf_counter()
        resolved = await self._engine.preload(tenant, request.base_model, specs, tier)
        return inference_pb2.PreloadAdaptersResponse(
            adapters=[inference_pb2.ResolvedAdapter(name=a.name, version=a.version, kind=KINDS[a.kind],
                                                    manifest_digest=a.manifest_digest, weight=a.weight)
                      for a in resolved],
            load_ms=(time.perf_counter() - started) * 1000,
        )

    async def GetCacheStatus(self, request: inference_pb2.GetCacheStatusRequest,
                             context: grpc.aio.ServicerContext) -> inference_pb2.GetCacheStatusResponse:
        tiers = self._engine.tier_status(current_tenant())
        return inference_pb2.GetCacheStatusResponse(
            tiers=[tier_to_proto(t) for t in tiers],
            loaded_base_models=self._engine.pipelines.loaded(),
            queue_depth=self._engine.batcher.depth,
            queue_capacity=self._engine.batcher.capacity,
        )


def inference_bindings(engine: InferenceEngine, **_: Any) -> list[ServiceBinding]:
    """The ServiceBinding list for start_server."""
    servicer = InferenceServicer(engine)

    def register(server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)

    def on_start(running: RunningServer) -> None:
        async def report(serving: bool) -> None:  # the service and the server as a whole
            for name in (SERVICE_NAME, ""):
                await running.set_serving(name, serving)

        engine.watch_device(report)

    return [ServiceBinding(SERVICE_NAME, register, on_start, warmup=lambda: warm_start(engine))]


__all__ = ["SERVICE_NAME", "InferenceServicer", "inference_bindings"]
