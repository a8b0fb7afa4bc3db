"""Plain data passed between the servicer, the engine and the device: no proto, no torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.inference.merge_methods import LINEAR_MERGE, MergeSpec
from services.registry.refs import AdapterRef

if TYPE_CHECKING:
    from PIL.Image import Image as PilImage


@dataclass(frozen=True)
class AdapterSpec:
    """One `{adapter ref, weight}` of a request, validated."""

    ref: AdapterRef
    weight: float
    field: str  # "spec.adapters[i]", for errors about this entry


@dataclass(frozen=True)
class GenerationRequest:
    """A validated GenerationSpec. width/height 0 mean "the base model's native size", guidance 0
    the base model family's default guidance."""

    base_model: str
    prompt: str
    negative_prompt: str = ""
    adapters: tuple[AdapterSpec, ...] = ()
    num_images: int = 1
    steps: int = 30
    guidance_scale: float = 0.0  # 0: the base family's default (SD/SDXL 7.5, Flux 3.5)
    width: int = 0
    height: int = 0
    seed: int = 0
    scheduler: str = "default"
    merge: MergeSpec = LINEAR_MERGE  # how the LoRAs combine (merge_methods.py)
    # img2img / inpainting: the decoded init image (RGB) and mask ("L"), both of the output size.
    init_image: PilImage | None = field(default=None, compare=False)
    mask_image: PilImage | None = field(default=None, compare=False)
    strength: float = 1.0  # only meaningful with an init image

    @property
    def mode(self) -> str:
        """Which diffusers pipeline runs the request: "txt2img", "img2img" or "inpaint"."""
        if self.init_image is None:
            return "txt2img"
        return "img2img" if self.mask_image is None else "inpaint"


@dataclass(frozen=True)
class ResolvedAdapterInfo:
    name: str
    version: int
    kind: str
    manifest_digest: str
    weight: float


@dataclass(frozen=True)
class Progress:
    stage: str  # "queued", "loading_adapters", "denoising", "encoding"
    step: int = 0
    total_steps: int = 0
    elapsed_ms: float = 0.0


@dataclass
class Timings:
    queue_ms: float = 0.0
    adapter_load_ms: float = 0.0
    denoise_ms: float = 0.0
    encode_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class Image:
    png: bytes
    seed: int
    width: int
    height: int
    safety_flagged: bool = False  # the safety hook flagged it; png is a black image


@dataclass
class GenerationResult:
    images: list[Image]
    adapters: list[ResolvedAdapterInfo]
    base_model_digest: str
    batch_size: int
    timings: Timings = field(default_factory=Timings)
