"""The pipeline pool: base models loaded once per replica, plus what differs per architecture.

A base model comes from `settings.base_model_paths` (name=DIR) or from the registry
(materialised once under `<cache_dir>/base-models/<digest>/`). Its digest is the registry's
(sha256 over the sorted (path, sha256) file list), computed the same way for a local folder, so
an adapter manifest's `base_model_digest` can be checked whichever way the base arrived.
Base models are never evicted: which ones a replica serves is configuration. A registry model
is served as its pinned version `name@N`, so importing a new version loads it alongside.

What differs per model family (SD 1.x, SDXL, Flux: prompt encoding, classifier-free guidance
or a guidance embedding, the default size, which schedulers apply, how LoRAs load) is asked of
the family's `inference` part (services/families/<name>/inference.py) through `BaseModel`;
nothing here branches on pipeline classes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.utils import is_scipy_available

from services.common.config import Settings
from services.common.errors import FailedPrecondition, InvalidInput, NotFound, Unavailable
from services.common.model_loading import MODEL_LOAD_LOCK
from services.families import ModelFamily, of_pipeline
from services.inference.cache import ByteLRU
from services.inference.textual_inversion import DEFAULT_SLOTS, TiEncoder, TiSlots
from services.registry.base_models import collect_files
from services.registry.blobs import sha256_file
from services.registry.manifests import BaseModelManifest, FileRecord, files_digest
from services.registry.registry import Registry

Pipeline = Any
"""A diffusers pipeline (their attributes are registered dynamically, so typed loosely)."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "ddim": DDIMScheduler.from_config,
    "euler": EulerDiscreteScheduler.from_config,
    "euler_ancestral": EulerAncestralDiscreteScheduler.from_config,
    "dpm_solver_multistep": DPMSolverMultistepScheduler.from_config,
    "pndm": PNDMScheduler.from_config,
}
if is_scipy_available():  # LMS needs scipy, which the base image does not ship
    from diffusers import LMSDiscreteScheduler

    SCHEDULERS["lms"] = LMSDiscreteScheduler.from_config


def folder_digest(folder: Path) -> str:
    """The registry's base-model digest of a local diffusers folder."""
    records = []
    for rel, path in collect_files(folder).items():
        sha, size = sha256_file(path)
        records.append(FileRecord(path=rel, sha256=sha, size=size))
    return files_digest(records)


@dataclass
class BaseModel:
    """One loaded base pipeline and what the engine needs to know about it."""

    name: str  # what it is served as: a configured name, or a registry version's `name@N`
    digest: str
    pipe: Pipeline
    family: ModelFamily
    device: torch.device
    dtype: torch.dtype
    slots: TiSlots | None
    _schedulers: dict[str, Any] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        """The name without the version: what adapter manifests record as their base_model."""
        return self.name.partition("@")[0]

    @property
    def part(self) -> ModuleType:
        """The family's inference behaviour (services/families/<name>/inference.py)."""
        return self.family.part("inference")

    @property
    def default_size(self) -> int:
        return int(self.part.default_size(self.pipe))

    def cfg(self, guidance_scale: float) -> bool:
        """Whether a call with this guidance scale runs classifier-free guidance (two halves)."""
        return bool(self.part.cfg(guidance_scale))

    def denoiser(self, pipe: Pipeline | None = None) -> torch.nn.Module:
        """The UNet or transformer of `pipe` (default: the base pipeline)."""
        return getattr(self.pipe if pipe is None else pipe, self.family.denoiser)  # type: ignore[no-any-return]

    def scheduler(self, kind: str) -> Any:
        """A scheduler instance of `kind` ("default": the model's own) built from its config."""
        if kind == "default":
            return self._schedulers.setdefault("default", self.pipe.scheduler)
        allowed = self.part.SCHEDULERS
        if allowed is not None and kind not in allowed:
            raise InvalidInput("spec.scheduler", f"scheduler {kind!r} does not apply to {self.family.title} "
                                                 f"base models (use: {', '.join(allowed)})")
        if kind not in SCHEDULERS:
            raise InvalidInput("spec.scheduler", f"scheduler {kind!r} is not available on this server")
        if kind not in self._schedulers:
            self._schedulers[kind] = SCHEDULERS[kind](self.pipe.scheduler.config)
        return self._schedulers[kind]


def encode(base: BaseModel, pipe: Pipeline, prompt: str, negative: str, num_images: int, guidance: bool,
           raw_prompt: str = "", raw_negative: str = "") -> dict[str, torch.Tensor]:
    """Per-request prompt embeddings as the pipeline's keyword arguments (uncond only with CFG).

    `prompt`/`negative` carry TI slot tokens; `raw_*` are the request's own texts, for encoders
    that never hold TI vectors (Flux's T5).
    """
    return base.part.encode(pipe, base.device, prompt, negative, num_images, guidance,  # type: ignore[no-any-return]
                            raw_prompt or prompt, raw_negative or negative)


def ti_slots(family: ModelFamily, pipe: Pipeline, count: int,
             encoders: dict[str, torch.nn.Module] | None = None) -> TiSlots | None:
    """Reserved TI rows in the family's TI text encoders (None: the family has no TI).

    `encoders` overrides some of the pipeline's encoders (a DreamBooth variant's retrained ones).
    """
    slots = family.ti_slots
    if not slots:
        return None
    chosen = encoders or {}
    return TiSlots([TiEncoder(slot.ti_key, getattr(pipe, slot.tokenizer),
                              chosen.get(slot.encoder, getattr(pipe, slot.encoder))) for slot in slots], count)


def _freeze(module: torch.nn.Module) -> None:
    module.eval()
    module.requires_grad_(False)


class PipelinePool:
    """Base models by name, each loaded at most once (single flight) and kept."""

    def __init__(self, settings: Settings, registry: Registry | None, ti_slots: int = DEFAULT_SLOTS) -> None:
        self._settings = settings
        self._registry = registry
        self._paths = settings.local_base_models()
        self._ti_slots = ti_slots
        self.device = torch.device(settings.inference_device)
        if settings.inference_dtype not in DTYPES:
            raise ValueError(f"inference_dtype {settings.inference_dtype!r}: expected one of {sorted(DTYPES)}")
        self.dtype = DTYPES[settings.inference_dtype]
        self._models: ByteLRU[str, BaseModel] = ByteLRU("base-models", 1, lambda _m: 0)
        self._ttl = settings.adapter_ref_ttl_seconds
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[BaseModelManifest, float]] = {}  # plain name -> (newest, when)

    def get(self, ref: str) -> BaseModel:
        """The loaded base model; NotFound for a name neither configured nor in the registry.

        `ref` is a configured name, or a registry `name@N` / `name` (its newest version, re-read
        after adapter_ref_ttl_seconds like an adapter's "latest"). Registry models are kept under
        their pinned `name@N`, so a newly imported version loads next to the old one instead of
        being served the old bytes, and two versions never share a batch or device attachments.
        """
        local = self._models.peek(ref)
        if local is not None:
            return local
        if ref in self._paths:
            return self._models.get_or_load(ref, lambda: self._load_folder(ref, self._paths[ref]))
        manifest = self._resolve(ref)
        return self._models.get_or_load(manifest.ref, lambda: self._load_registry(manifest))

    def loaded(self) -> list[str]:
        return sorted(self._models.keys())

    def peek(self, ref: str) -> BaseModel | None:
        """The loaded model `ref` names without any I/O, if that is known (else None: call get)."""
        model = self._models.peek(ref)
        if model is not None:
            return model
        with self._lock:
            hit = self._latest.get(ref)
        if hit is None or time.monotonic() - hit[1] >= self._ttl:
            return None
        return self._models.peek(hit[0].ref)

    def _resolve(self, ref: str) -> BaseModelManifest:
        if self._registry is None:
            raise NotFound("base model", ref)
        with self._lock:
            hit = self._latest.get(ref)
        try:
            manifest = self._registry.base_models.get(ref)
        except Unavailable:
            if hit is not None:
                return hit[0]  # stale but consistent, as for adapters
            raise
        if "@" not in ref:
            with self._lock:
                self._latest[ref] = (manifest, time.monotonic())
        return manifest

    def _load_registry(self, manifest: BaseModelManifest) -> BaseModel:
        assert self._registry is not None
        folder = self._registry.base_models.materialize(manifest, Path(self._settings.cache_dir) / "base-models")
        return self._load(manifest.ref, folder, manifest.digest)

    def _load_folder(self, name: str, folder: Path) -> BaseModel:
        if not (folder / "model_index.json").is_file():
            raise FailedPrecondition(f"base model {name!r}: {folder} is not a diffusers folder")
        return self._load(name, folder, folder_digest(folder))

    def _load(self, name: str, folder: Path, digest: str) -> BaseModel:
        index = json.loads((folder / "model_index.json").read_text())
        # Safety checkers are a product decision of the caller, not part of serving adapters.
        extra: dict[str, Any] = {"safety_checker": None} if "safety_checker" in index else {}
        with MODEL_LOAD_LOCK:  # see services/common/model_loading.py
            pipe: Pipeline = DiffusionPipeline.from_pretrained(
                folder, torch_dtype=self.dtype, use_safetensors=True, **extra)
        return self._serve(name, digest, pipe)

    def register(self, name: str, pipe: Pipeline, digest: str = "") -> BaseModel:
        """Serve an already-built pipeline under `name` (benchmarks, embedding: no disk round trip).

        Adapters whose manifest names a base_model_digest must match `digest`.
        """
        model = self._serve(name, digest, pipe.to(dtype=self.dtype))
        self._models.put(name, model)
        return model

    def _serve(self, name: str, digest: str, pipe: Pipeline) -> BaseModel:
        family = of_pipeline(pipe)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                _freeze(component)
        slots = ti_slots(family, pipe, self._ti_slots)
        return BaseModel(name, digest, pipe, family, self.device, self.dtype, slots)
