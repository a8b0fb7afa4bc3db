"""DreamBooth: a pipeline variant whose trained components replace the base's.

A DreamBooth adapter ships full component folders (`unet/config.json` +
`unet/diffusion_pytorch_model.safetensors`, or `transformer/...` for Flux, optionally
`text_encoder/...`): any of the family's trainable components (`ModelFamily.components`).
The variant is a new pipeline object of the base's class built from the base's components
with the trained ones swapped in: the base pipeline is never modified, so "restoring the
originals" is simply running the base again, and the untouched components (VAE, tokenizer, usually the text encoder) are
shared, not copied. Variants live in their own bytes-bounded tier (`dreambooth_cache_bytes`);
LoRA and TI adapters attach to a variant like to a base, so DreamBooth + LoRA + TI in one
request works.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.common.model_loading import MODEL_LOAD_LOCK
from services.inference.pipelines import BaseModel, Pipeline, ti_slots
from services.inference.textual_inversion import DEFAULT_SLOTS, TiSlots

# Config fields that must agree with the base for a swapped component to fit the pipeline.
_MUST_MATCH = ("in_channels", "out_channels", "cross_attention_dim", "hidden_size", "projection_dim",
               "joint_attention_dim", "pooled_projection_dim", "guidance_embeds", "d_model")


@dataclass
class Variant:
    """A base pipeline with some components swapped; `owned` are the swapped-in modules."""

    id: str
    base: BaseModel
    pipe: Pipeline
    owned: dict[str, torch.nn.Module]
    slots: TiSlots | None
    nbytes: int


def module_nbytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_compatible(name: str, original: torch.nn.Module, config_path: Path) -> None:
    config = json.loads(config_path.read_text())
    raw: Any = getattr(original, "config", None)
    base_config = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw or {})
    for key in _MUST_MATCH:
        if key in config and key in base_config and config[key] != base_config[key]:
            raise FailedPrecondition(
                f"DreamBooth {name}: {key}={config[key]} does not match the base model's {base_config[key]}",
                field_name="spec.adapters",
            )


def _load_component(name: str, original: torch.nn.Module, folder: Path, base: BaseModel) -> torch.nn.Module:
    _check_compatible(name, original, folder / "config.json")
    cls = type(original)
    with MODEL_LOAD_LOCK:  # see services/common/model_loading.py
        module = cls.from_pretrained(folder, torch_dtype=base.dtype, use_safetensors=True)  # type: ignore[attr-defined]
    module.to(base.device)
    module.eval()
    module.requires_grad_(False)
    return module


def build_variant(variant_id: str, base: BaseModel, files: dict[str, Path],
                  slot_count: int = DEFAULT_SLOTS) -> Variant:
    """Load the adapter's components onto the device and assemble the variant pipeline."""
    with tempfile.TemporaryDirectory(prefix="atelier-db-") as tmp:
        root = Path(tmp)
        for rel, path in files.items():
            link = root / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), link)
        owned: dict[str, torch.nn.Module] = {}
        for name in base.family.components:
            original = getattr(base.pipe, name, None)
            if original is not None and (root / name / "config.json").is_file():
                owned[name] = _load_component(name, original, root / name, base)
    if not owned:
        raise FailedPrecondition("DreamBooth adapter has no component matching the base pipeline")
    cls = type(base.pipe)
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in inspect.signature(cls).parameters else {}
    pipe = cls(**{**base.pipe.components, **owned}, **extra)
    pipe.set_progress_bar_config(disable=True)
    slots = base.slots
    retrained = [slot.encoder in owned for slot in base.family.ti_slots]
    if retrained and all(retrained):
        # Same tokenizers (their slot tokens already exist), fresh rows in the retrained encoders.
        slots = ti_slots(base.family, base.pipe, slot_count, owned)
    elif any(retrained):
        slots = None  # rows in a shared and a retrained encoder could not move in lockstep: no TI here
    return Variant(variant_id, base, pipe, owned, slots, sum(module_nbytes(m) for m in owned.values()))
