"""What a model family is: the facts every layer asks instead of branching on class names.

A family (SD 1.x/2.x, SDXL, Flux) is detected from a pipeline folder's `model_index.json` or
from a loaded pipeline. The facts kept here are plain data (component names, LoRA targets,
kohya prefixes, the training objective); behaviour that differs per family (prompt
conditioning, the denoiser call, key maps) lives in modules of the family's own folder,
`services/families/<name>/<concern>.py`, found through `ModelFamily.part(concern)`. Adding a
family therefore touches that one folder (plus `FAMILIES` in `services/families/__init__.py`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

OBJECTIVE_DIFFUSION = "diffusion"
"""DDPM noise prediction; epsilon / v / sample comes from the scheduler config."""
OBJECTIVE_FLOW = "flow_matching"
"""Rectified flow: x_t = (1 - s) x0 + s noise, the model predicts noise - x0."""

TinyBuilder = Callable[[Path, Path, int], Path]
"""(out_dir, clip_tokenizer_dir, seed) -> out_dir: a random-initialised tiny pipeline."""


@dataclass(frozen=True)
class TextEncoderSlot:
    """One text encoder and its tokenizer, as the pipeline names them."""

    encoder: str  # component name: "text_encoder", "text_encoder_2"
    tokenizer: str  # component name: "tokenizer", "tokenizer_2"
    kind: str  # "clip" | "clip_projection" | "t5"
    kohya_prefixes: tuple[str, ...] = ()  # kohya names for its LoRA modules; the first is written
    ti_key: str = ""  # key of this encoder's vectors in an A1111/ComfyUI TI file; "" = no TI


@dataclass(frozen=True)
class ModelFamily:
    """The plain facts of one model family."""

    name: str  # "sd1" | "sdxl" | "flux"
    title: str  # for messages: "Stable Diffusion 1.x/2.x"
    pipeline_classes: tuple[str, ...]  # model_index.json `_class_name`s, text-to-image first
    denoiser: str  # "unet" | "transformer"
    denoiser_class: str  # diffusers class of the denoiser
    text_encoders: tuple[TextEncoderSlot, ...]
    objective: str  # OBJECTIVE_DIFFUSION | OBJECTIVE_FLOW
    lora_targets: tuple[str, ...]  # denoiser module-name suffixes a default LoRA wraps
    text_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    kohya_denoiser_prefix: str = "lora_unet_"
    packed_latents: bool = False  # Flux packs 2x2 latent patches into tokens
    tiny_builder: str = ""  # "module:function" of its TinyBuilder, "" = none in this folder
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def pipeline_class(self) -> str:
        return self.pipeline_classes[0]

    @property
    def components(self) -> tuple[str, ...]:
        """The trainable-model components: denoiser first, then the text encoders."""
        return (self.denoiser, *(slot.encoder for slot in self.text_encoders))

    @property
    def ti_slots(self) -> tuple[TextEncoderSlot, ...]:
        """Text encoders Textual Inversion trains (empty: the family has no TI)."""
        return tuple(slot for slot in self.text_encoders if slot.ti_key)

    def encoder(self, component: str) -> TextEncoderSlot:
        for slot in self.text_encoders:
            if slot.encoder == component:
                return slot
        raise KeyError(f"{self.name} has no text encoder {component!r}")

    def part(self, concern: str) -> ModuleType:
        """This family's module for one concern (`training`, `inference`, `interop`, ...)."""
        return importlib.import_module(f"services.families.{self.name}.{concern}")

    def build_tiny(self, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
        """Write a tiny random pipeline of this family (see TinyBuilder)."""
        if not self.tiny_builder:
            raise NotImplementedError(f"family {self.name} has no tiny builder")
        module, _, function = self.tiny_builder.partition(":")
        builder: TinyBuilder = getattr(importlib.import_module(module), function)
        return builder(Path(out_dir), Path(tokenizer_dir), seed)
