"""One pipeline call for one batch, on the device thread.

Seeds are exact per request: image i of a request uses its own `torch.Generator` seeded with
seed + i (CPU generators, so a seed means the same noise on any device), drawn in the same
order whether the request runs alone or batched.

Bytes are exact too, in `exact` mode (the default). Per-request generators are not enough for
that: CPU kernels pick different blockings for different batch sizes (measured here: oneDNN
convolutions and small-M GEMMs such as the UNet's time embedding differ by ~1e-6 between batch
1 and batch 4, which flips a PNG pixel now and then). So in exact mode the batch shares one
pipeline call (one denoising loop, one callback, one scheduler), prompts are encoded per
request, the UNet is evaluated per request (its rows gathered from the batched tensors in the
layout the request has alone) and the VAE decodes image by image. A request's pixels then never
depend on its companions. `exact=False` runs the UNet on the whole batch (more throughput on a
GPU; results may differ from an unbatched run in the last bit).

Cancellation: nothing is dropped mid-call, but once every request of the batch is dead
(cancelled or past its deadline), or the engine shuts down, `BatchAborted` ends the call: from
the step callback between denoising steps, and from the `AbortGuard`'s hooks inside the UNet,
VAE (decode and encode) and text-encoder forwards (see abort.py), so the device is free again
within one convolution or attention block, not one step.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from services.common.errors import AtelierError
from services.inference.abort import AbortGuard, BatchAborted
from services.inference.batcher import WorkItem
from services.inference.device import AdapterUse, DeviceState, PreparedBatch
from services.inference.hetero import per_sample_deltas, row_plan, supported
from services.inference.img2img import mode_kwargs, pipeline_for
from services.inference.metrics import InferenceMetrics
from services.inference.pipelines import BaseModel, encode
from services.inference.textual_inversion import rewrite_prompts
from services.inference.types import GenerationRequest, Progress

SEED_MODULUS = 2**64
UNET_PREFIXES = ("unet", "transformer")


@dataclass(frozen=True)
class Job:
    """What one WorkItem carries to the device."""

    request: GenerationRequest
    base: BaseModel
    uses: tuple[AdapterUse, ...]
    width: int
    height: int
    # Prompt embeddings computed while a cold adapter downloaded (step loop only; see engine).
    embeddings: dict[str, torch.Tensor] | None = field(default=None, compare=False)


@dataclass
class BatchOutput:
    images: list[list[np.ndarray]]  # per item, uint8 HxWx3 (empty where errors[i] is set)
    attach_ms: float
    denoise_ms: float
    errors: list[BaseException | None] = field(default_factory=list)  # per item; [] = none failed
    path: str = "merged"  # "merged" (one mix in the weights), "hetero" (per-sample deltas), "groups"


def mix_key(job: Job) -> tuple[Any, ...]:
    """A request's LoRA mix as the batch sees it (zero weights contribute nothing)."""
    return tuple((u.key, u.weight) for u in job.uses if u.kind == "LORA" and u.weight != 0.0)


def image_seeds(request: GenerationRequest) -> list[int]:
    return [(request.seed + i) % SEED_MODULUS for i in range(request.num_images)]


def _take(value: Any, index: torch.Tensor, total: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value.index_select(0, index)
    if isinstance(value, dict):
        return {k: _take(v, index, total) for k, v in value.items()}
    return value


def _layout(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _same_layout(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Rows gathered in the memory layout of the batch they came from, as the solo run sees them.

    img2img latents come out of the VAE encoder channels-last; a gather would make them
    contiguous, and oneDNN convolutions round differently per layout (measured ~1e-5).
    """
    return part.contiguous(memory_format=_layout(like))


@contextlib.contextmanager
def per_request_denoiser(denoiser: torch.nn.Module, groups: Sequence[Sequence[int]], sample_arg: str = "sample",
                         unbatched: frozenset[str] = frozenset()) -> Iterator[None]:
    """Evaluate the UNet/transformer once per row group instead of on the whole batch (module doc).

    The batched input comes first, positionally or as keyword `sample_arg`; keyword arguments
    in `unbatched` (Flux's position ids: no batch axis) are passed whole to every group.
    """
    original = denoiser.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        sample = args[0] if args else kwargs[sample_arg]
        total = sample.shape[0]
        out: torch.Tensor | None = None

        def rows(value: Any, index: torch.Tensor) -> Any:
            if value is sample:  # the solo run's memory layout (see _same_layout)
                return _same_layout(sample.index_select(0, index), sample)
            return _take(value, index, total)

        for group in groups:
            index = torch.tensor(group, device=sample.device)
            part = original(*[rows(a, index) for a in args],
                            **{k: v if k in unbatched else rows(v, index)
                               for k, v in kwargs.items() if k != "return_dict"},
                            return_dict=False)[0]
            if out is None:
                out = torch.empty((total, *part.shape[1:]), dtype=part.dtype, device=part.device,
                                  memory_format=_layout(part))
            out[index] = part
        assert out is not None
        return (out,)

    denoiser.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        del denoiser.forward


class Runner:
    """Runs batches: prepare adapters, encode, denoise, decode (device thread only)."""

    def __init__(self, device: DeviceState, metrics: InferenceMetrics, exact: bool = True,
                 guard: AbortGuard | None = None) -> None:
        self._device = device
        self._metrics = metrics
        self._exact = exact
        self.guard = guard or AbortGuard()
        self.paths: Counter[str] = Counter()  # batches per path taken (merged/hetero/groups)

    @property
    def exact(self) -> bool:
        return self._exact

    def run(self, items: list[WorkItem]) -> BatchOutput:
        """The batch's pipeline call; BatchAborted once all its requests are dead (any time)."""
        with self.guard.running(items):
            output = self._run(items)
        self.paths[output.path] += 1
        return output

    def _run(self, items: list[WorkItem]) -> BatchOutput:
        """One mix: merged into the weights. Several (LINEAR only, by the batch key): per-sample
        deltas in one UNet forward (hetero.py), or, when the union cannot attach or a layer is
        not plain, one pipeline call per mix so a failure stays with its own requests."""
        jobs: list[Job] = [item.payload for item in items]
        if len({mix_key(job) for job in jobs}) == 1:
            return self._call(items, self._device.attach(jobs[0].base, [j.uses for j in jobs]), hetero=False)
        try:
            prepared = self._device.attach(jobs[0].base, [j.uses for j in jobs])
        except AtelierError:
            return self._groups(items)
        names = {name for mix in prepared.mixes for name, _w in mix}
        if not supported([m for m in prepared.mergers if m.prefix in UNET_PREFIXES], names):
            return self._groups(items)
        return self._call(items, prepared, hetero=True)

    def _groups(self, items: list[WorkItem]) -> BatchOutput:
        """One merged pipeline call per distinct mix; errors stay with their group's requests."""
        by_mix: dict[tuple[Any, ...], list[int]] = {}
        for i, item in enumerate(items):
            by_mix.setdefault(mix_key(item.payload), []).append(i)
        images: list[list[np.ndarray]] = [[] for _ in items]
        errors: list[BaseException | None] = [None] * len(items)
        attach_ms = denoise_ms = 0.0
        for indices in by_mix.values():
            group = [items[i] for i in indices]
            try:
                jobs = [item.payload for item in group]
                out = self._call(group, self._device.attach(jobs[0].base, [j.uses for j in jobs]), hetero=False)
            except AtelierError as exc:
                for i in indices:
                    errors[i] = exc
                continue
            attach_ms, denoise_ms = attach_ms + out.attach_ms, denoise_ms + out.denoise_ms
            for i, pixels in zip(indices, out.images, strict=True):
                images[i] = pixels
        return BatchOutput(images, attach_ms, denoise_ms, errors, path="groups")

    def _call(self, items: list[WorkItem], prepared: PreparedBatch, hetero: bool) -> BatchOutput:
        jobs: list[Job] = [item.payload for item in items]
        first = jobs[0]
        pipe = prepared.pipe
        if not hetero:
            for merger in prepared.mergers:
                merger.apply(prepared.mixes[0], first.request.merge)
        self.guard.hook(pipe)
        req = first.request
        guidance = first.base.cfg(req.guidance_scale)
        text = [m for m in prepared.mergers if m.prefix not in UNET_PREFIXES] if hetero else []

        def text_mix(j: int) -> None:
            for merger in text:
                merger.apply(prepared.mixes[j])

        kwargs = self._embeddings(jobs, first.base, pipe, prepared.ti, guidance, text_mix)
        generators = [torch.Generator("cpu").manual_seed(s) for job in jobs for s in image_seeds(job.request)]
        pipe.scheduler = first.base.scheduler(req.scheduler)
        call = pipeline_for(pipe, req.mode)  # img2img / inpaint share pipe's components
        call.scheduler = pipe.scheduler
        pipe.vae.use_slicing = self._exact
        started = time.perf_counter()
        callback = self._callback(items, req.steps, started)
        with self._unet_mode(pipe, jobs, guidance, prepared if hetero else None):
            output = call(
                **kwargs, num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                **mode_kwargs([job.request for job in jobs], first.width, first.height,
                              first.base.part.SIZE_FROM_IMAGE),
                generator=generators, output_type="np",
                callback_on_step_end=callback,
            )
        denoise_ms = (time.perf_counter() - started) * 1000
        pixels = (np.asarray(output.images) * 255).round().astype("uint8")
        result: list[list[np.ndarray]] = []
        offset = 0
        for job in jobs:
            n = job.request.num_images
            result.append([pixels[offset + i] for i in range(n)])
            offset += n
        return BatchOutput(result, prepared.attach_ms, denoise_ms, path="hetero" if hetero else "merged")

    @staticmethod
    def _embeddings(jobs: Sequence[Job], base: BaseModel, pipe: Any, ti: Sequence[Sequence[Any]],
                    guidance: bool, before: Callable[[int], None]) -> dict[str, torch.Tensor]:
        """Prompts encoded request by request, each with its own TI bindings; `before(j)` puts
        request j's LoRA mix into the text encoders on the hetero path."""
        parts: dict[str, list[torch.Tensor]] = {}
        for j, job in enumerate(jobs):
            before(j)
            prompt, negative = rewrite_prompts(job.request.prompt, job.request.negative_prompt, ti[j])
            for name, tensor in encode(base, pipe, prompt, negative, job.request.num_images, guidance,
                                       job.request.prompt, job.request.negative_prompt).items():
                parts.setdefault(name, []).append(tensor)
        return {name: torch.cat(tensors) for name, tensors in parts.items()}

    def _unet_mode(self, pipe: Any, jobs: Sequence[Job], guidance: bool,
                   hetero: PreparedBatch | None) -> contextlib.AbstractContextManager[Any]:
        """Hetero: the whole batch in one forward with per-row deltas. Merged: exact mode runs
        the UNet per request (module doc), else on the whole batch."""
        total = sum(job.request.num_images for job in jobs)
        groups: list[list[int]] = []
        offset = 0
        for job in jobs:
            rows = list(range(offset, offset + job.request.num_images))
            groups.append(rows + [total + r for r in rows] if guidance else rows)
            offset += job.request.num_images
        if hetero is not None:
            unet = [m for m in hetero.mergers if m.prefix in UNET_PREFIXES]
            stack = contextlib.ExitStack()
            for merger in unet:
                stack.enter_context(per_sample_deltas(merger, row_plan(groups, hetero.mixes), sum(map(len, groups))))
            return stack
        if not self._exact or len(jobs) == 1:
            return contextlib.nullcontext()
        base = jobs[0].base
        return per_request_denoiser(base.denoiser(pipe), groups, base.part.DENOISER_SAMPLE_ARG,
                                    base.part.UNBATCHED_ARGS)

    def _callback(self, items: list[WorkItem], steps: int, started: float) -> Any:
        last = [started]

        def on_step_end(pipe: Any, step: int, _timestep: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
            now = time.perf_counter()
            self._metrics.step_seconds.observe(now - last[0])
            last[0] = now
            alive = [item for item in items if not item.dead()]
            if not alive:
                raise BatchAborted()
            self._metrics.step_batch_size.observe(len(alive))
            # Some schedulers run more model evaluations than requested steps (PNDM: steps + 1).
            total = int(getattr(pipe, "num_timesteps", 0) or steps)
            for item in alive:
                if item.progress is not None:
                    item.progress(Progress("denoising", step + 1, total, (now - started) * 1000))
            return {}

        return on_step_end
