"""Step-level continuous batching, device side: our own denoising loop over the UNet.

diffusers' pipeline call owns its loop, so a batch is fixed from its first step to its last.
Here every request is a `RowState` (its latents, prompt embeddings, its own scheduler instance:
diffusers schedulers are stateful per request, and its generators), and `Stepper.step` runs one
denoising step for every running request: rows of requests that share a latent shape and base
model go through one UNet forward, each row with its own timestep (the UNet takes a per-sample
timestep tensor), so requests with different step counts, schedulers, guidance scales or CFG
on/off share a forward. Requests are admitted (`admit`: attach, encode, draw the noise) and
retired (VAE decode as soon as their last step is done) between steps by continuous.py.

LoRA: a group whose requests all use one mix runs on merged weights (as a solo request does:
bit-exact with diffusers' fused LoRA); several mixes run on the base weights plus per-row deltas
(hetero.py), hooks built once per group composition and reused while it is unchanged. In
`exact` mode a single-mix group runs the UNet once per request, so it gives the solo bytes.

The math is the SD pipeline's loop (scale_model_input, CFG as uncond + g (text - uncond),
scheduler.step with eta 0 and the request's generators, decode / scaling_factor), so a solo
request gives diffusers' bytes. Device thread only.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from services.families import SD1
from services.inference.abort import AbortGuard
from services.inference.batcher import WorkItem
from services.inference.device import DeviceState
from services.inference.hetero import delta_hooks, installed, row_plan, supported
from services.inference.lora import LoraMerger, Mix
from services.inference.merge_methods import LINEAR
from services.inference.metrics import InferenceMetrics
from services.inference.pipelines import BaseModel, encode
from services.inference.runner import UNET_PREFIXES, Job, image_seeds
from services.inference.textual_inversion import rewrite_prompts
from services.inference.types import GenerationRequest, Progress

Embeddings = dict[str, torch.Tensor]


def streamable(job: Job) -> bool:
    """Requests the step loop serves; the rest (DreamBooth weights, TIES/DARE mixes, img2img and
    inpainting, SDXL and Flux, guidance-embedding UNets) keep the pipeline-call path (runner.py):
    the loop below is SD 1.x's (one text-embedding input, CFG halves, an unpacked UNet)."""
    req = job.request
    return (job.base.family.name == SD1.name and req.mode == "txt2img" and req.merge.normalised().method == LINEAR
            and all(u.kind != "DREAMBOOTH" for u in job.uses)
            and getattr(job.base.pipe.unet.config, "time_cond_proj_dim", None) is None)


def touches_text(payload: Any) -> bool:
    """Whether a LoRA payload carries layers outside the UNet (kohya/PEFT/diffusers naming)."""
    state_dict = getattr(payload, "state_dict", None)
    if state_dict is None:
        return True
    return any(not k.startswith(("unet.", "lora_unet_", "transformer.")) for k in state_dict)


@dataclass(eq=False)
class RowState:
    """One running request."""

    item: WorkItem
    job: Job
    scheduler: Any
    latents: torch.Tensor
    embeds: torch.Tensor  # [negative; prompt] with CFG
    generators: list[torch.Generator]
    mix: Mix
    step_kwargs: dict[str, Any]
    attach_ms: float
    started: float = field(default_factory=time.perf_counter)
    index: int = 0
    device_s: float = 0.0
    peak: int = 1  # most requests it shared a step with (reported as batch_size)

    @property
    def cfg(self) -> bool:
        return self.job.request.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return self.latents.shape[0] * (2 if self.cfg else 1)

    @property
    def done(self) -> bool:
        return self.index >= len(self.scheduler.timesteps)

    def group(self) -> tuple[str, tuple[int, ...]]:
        return self.job.base.name, tuple(self.latents.shape[1:])


@dataclass(frozen=True)
class Finished:
    item: WorkItem
    pixels: list[np.ndarray]
    attach_ms: float
    denoise_ms: float
    batch_size: int
    device_seconds: float


def _text_mergers(device: DeviceState, base: BaseModel) -> list[LoraMerger]:
    return [m for m in device.mergers.for_pipeline(base.pipe) if m.prefix not in UNET_PREFIXES]


def encode_rows(base: BaseModel, request: GenerationRequest, prompt: str, negative: str) -> Embeddings:
    return encode(base, base.pipe, prompt, negative, request.num_images, request.guidance_scale > 1.0)


class Stepper:
    """The running requests' states and one-step-at-a-time denoising (see module doc)."""

    def __init__(self, device: DeviceState, metrics: InferenceMetrics, guard: AbortGuard, exact: bool) -> None:
        self._device = device
        self._metrics = metrics
        self._guard = guard
        self._exact = exact
        self._states: dict[WorkItem, RowState] = {}
        self._hooks: dict[Hashable, tuple[Hashable, list[Any]]] = {}  # group -> (composition, hooks)
        self.step_sizes: list[int] = []  # requests per step (tests: admission mid-run)
        self.base_encodes = 0  # prompts encoded during a cold fetch (tests)
        self.paths: Counter[str] = Counter()  # forwards per path: merged / hetero / per-mix

    # --- admission --------------------------------------------------------------------
    @torch.no_grad()
    def encode_base(self, base: BaseModel, request: GenerationRequest) -> Embeddings:
        """Prompt embeddings with the base text encoders (a cold request's adapter is still
        downloading; valid when its adapters carry no TI and no text-encoder LoRA)."""
        self.base_encodes += 1
        for merger in _text_mergers(self._device, base):
            merger.apply(())
        return encode_rows(base, request, request.prompt, request.negative_prompt)

    @torch.no_grad()
    def admit(self, items: Sequence[WorkItem]) -> list[BaseException | None]:
        """Attach, encode and draw the noise of each new request; an error fails only its own."""
        errors: list[BaseException | None] = []
        for item in items:
            try:
                self._states[item] = self._start(item)
                errors.append(None)
            except Exception as exc:  # reported to that request alone
                errors.append(exc)
        self._hold()
        return errors

    def _start(self, item: WorkItem) -> RowState:
        job: Job = item.payload
        base, req = job.base, job.request
        running = [s.job.uses for s in self._states.values() if s.job.base is base]
        prepared = self._device.attach(base, [*running, job.uses])
        mix = tuple((n, w) for n, w in prepared.mixes[-1] if w != 0.0)
        embeddings: Embeddings | None = job.embeddings
        if embeddings is None:
            for merger in _text_mergers(self._device, base):
                merger.apply(mix)
            prompt, negative = rewrite_prompts(req.prompt, req.negative_prompt, prepared.ti[-1])
            embeddings = encode_rows(base, req, prompt, negative)
        cfg = req.guidance_scale > 1.0
        embeds = (torch.cat([embeddings["negative_prompt_embeds"], embeddings["prompt_embeds"]]) if cfg
                  else embeddings["prompt_embeds"])
        template = base.scheduler(req.scheduler)
        scheduler = type(template).from_config(template.config)
        scheduler.set_timesteps(req.steps, device=base.device)
        generators = [torch.Generator("cpu").manual_seed(s) for s in image_seeds(req)]
        pipe = base.pipe
        shape = (req.num_images, pipe.unet.config.in_channels, job.height // pipe.vae_scale_factor,
                 job.width // pipe.vae_scale_factor)
        latents = randn_tensor(shape, generator=generators, device=base.device, dtype=embeds.dtype)
        params = set(inspect.signature(scheduler.step).parameters)
        step_kwargs = {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in params}
        return RowState(item, job, scheduler, latents * scheduler.init_noise_sigma, embeds, generators, mix,
                        step_kwargs, prepared.attach_ms)

    def _hold(self) -> None:
        """Protect the running rows' adapters from every other attach (preloads, batches)."""
        self._device.held = set().union(*(self._device.base_keys(s.job.base, s.job.uses)
                                          for s in self._states.values()))

    # --- stepping ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, items: Sequence[WorkItem]) -> list[Finished]:
        """One denoising step for every running request in `items` (states of requests not in
        `items` any more are forgotten); the requests whose last step this was, decoded."""
        for gone in [i for i in self._states if i not in items]:
            del self._states[gone]
        states = [self._states[i] for i in items if i in self._states]
        started = time.perf_counter()
        groups: dict[Hashable, list[RowState]] = {}
        for state in states:
            groups.setdefault(state.group(), []).append(state)
        with self._guard.running(items):
            for key, group in groups.items():
                self._guard.hook(group[0].job.base.pipe)
                self._forward(key, group)
            finished = [self._finish(s) for s in states if s.done]
        elapsed = time.perf_counter() - started
        self._account(states, elapsed)
        self._hooks = {k: v for k, v in self._hooks.items() if k in groups}
        self._hold()
        return finished

    def _account(self, states: Sequence[RowState], elapsed: float) -> None:
        self._metrics.step_seconds.observe(elapsed)
        self._metrics.step_batch_size.observe(len(states))
        self.step_sizes.append(len(states))
        del self.step_sizes[:-1000]
        images = sum(s.latents.shape[0] for s in states) or 1
        now = time.perf_counter()
        for s in states:
            s.device_s += elapsed * s.latents.shape[0] / images
            s.peak = max(s.peak, len(states))
            if s.item.progress is not None:
                s.item.progress(Progress("denoising", s.index, len(s.scheduler.timesteps), (now - s.started) * 1000))

    def _forward(self, key: Hashable, group: list[RowState]) -> None:
        pipe = group[0].job.base.pipe
        unet = [m for m in self._device.mergers.for_pipeline(pipe) if m.prefix in UNET_PREFIXES]
        mixes = {s.mix for s in group}
        names = {n for mix in mixes for n, _w in mix}
        path = "merged" if len(mixes) == 1 else "hetero" if self._plain(key, group, unet, names) else "per-mix"
        self.paths[path] += 1
        if path == "merged":
            for merger in unet:
                merger.apply(group[0].mix)
            parts = [[s] for s in group] if self._exact else [group]
            for part in parts:
                self._denoise(pipe, part)
        elif path == "hetero":
            for merger in unet:
                merger.apply(())
            with installed(self._group_hooks(key, group, unet)):
                self._denoise(pipe, group)
        else:  # a layer that cannot take per-row deltas (DoRA...): one merged forward per mix
            for mix in mixes:
                for merger in unet:
                    merger.apply(mix)
                self._denoise(pipe, [s for s in group if s.mix == mix])

    def _plain(self, key: Hashable, group: list[RowState], unet: list[LoraMerger], names: set[str]) -> bool:
        """supported() walks every layer: asked once per composition (cached hooks mean yes)."""
        cached = self._hooks.get(key)
        if cached is not None and cached[0] == tuple((id(s), s.rows, s.mix) for s in group):
            return True
        return supported(unet, names)

    def _group_hooks(self, key: Hashable, group: list[RowState], unet: list[LoraMerger]) -> list[Any]:
        composition = tuple((id(s), s.rows, s.mix) for s in group)
        cached = self._hooks.get(key)
        if cached is not None and cached[0] == composition:
            return cached[1]
        offsets, rows = [], 0
        for s in group:
            offsets.append(list(range(rows, rows + s.rows)))
            rows += s.rows
        plan = row_plan(offsets, [s.mix for s in group])
        hooks = [h for merger in unet for h in delta_hooks(merger, plan, rows)]
        self._hooks[key] = (composition, hooks)
        return hooks

    def _denoise(self, pipe: Any, group: Sequence[RowState]) -> None:
        samples, timesteps = [], []
        for s in group:
            t = s.scheduler.timesteps[s.index]
            x = torch.cat([s.latents] * 2) if s.cfg else s.latents
            samples.append(s.scheduler.scale_model_input(x, t))
            timesteps.append(t.float().reshape(1).expand(s.rows))
        noise = pipe.unet(torch.cat(samples), torch.cat(timesteps), encoder_hidden_states=torch.cat(
            [s.embeds for s in group]), return_dict=False)[0]
        offset = 0
        for s in group:
            part = noise[offset:offset + s.rows]
            offset += s.rows
            if s.cfg:
                uncond, text = part.chunk(2)
                part = uncond + s.job.request.guidance_scale * (text - uncond)
            t = s.scheduler.timesteps[s.index]
            s.latents = s.scheduler.step(part, t, s.latents, **s.step_kwargs, return_dict=False)[0]
            s.index += 1

    def _finish(self, s: RowState) -> Finished:
        """VAE decode (image by image in exact mode, as the pipeline path) and forget the state."""
        pipe = s.job.base.pipe
        pipe.vae.use_slicing = self._exact
        image = pipe.vae.decode(s.latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=s.generators)[0]
        image = pipe.image_processor.postprocess(image, output_type="np", do_denormalize=[True] * image.shape[0])
        pixels = (np.asarray(image) * 255).round().astype("uint8")
        del self._states[s.item]
        return Finished(s.item, [pixels[i] for i in range(pixels.shape[0])], s.attach_ms,
                        (time.perf_counter() - s.started) * 1000, s.peak, s.device_s)
