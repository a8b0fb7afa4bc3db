"""Model families (SD 1.x/2.x, SDXL, Flux): detection and the registry of known families.

Every layer that must know the architecture asks here: `detect(folder)` for a pipeline on disk,
`of_pipeline(pipe)` for a loaded one, `by_name(name)` for a recorded family name. Family names
are recorded in manifests, so they are part of the storage format: "sd1", "sdxl", "flux".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from services.common.errors import FailedPrecondition
from services.families.base import OBJECTIVE_DIFFUSION, OBJECTIVE_FLOW, ModelFamily, TextEncoderSlot
from services.families.flux import FLUX
from services.families.sd1 import SD1
from services.families.sdxl import SDXL

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (SD1, SDXL, FLUX)}

__all__ = [
    "FAMILIES", "FLUX", "OBJECTIVE_DIFFUSION", "OBJECTIVE_FLOW", "SD1", "SDXL", "ModelFamily",
    "TextEncoderSlot", "by_name", "detect", "detect_index", "mismatch", "of_pipeline",
]


def by_name(name: str) -> ModelFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise FailedPrecondition(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect_index(index: dict[str, Any]) -> ModelFamily:
    """The family of a parsed model_index.json: by pipeline class, else by component classes.

    The fallback reads what the components are (a `transformer` with a T5 encoder is Flux, a
    UNet with a projected second CLIP encoder is SDXL), so renamed or derived pipeline
    classes (community img2img variants, say) are still recognised.
    """
    name = str(index.get("_class_name", ""))
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    classes = {key: value[1] for key, value in index.items() if isinstance(value, (list, tuple)) and len(value) == 2}
    if "transformer" in classes and classes.get("text_encoder_2") == "T5EncoderModel":
        return FLUX
    if "unet" in classes and classes.get("text_encoder_2") == "CLIPTextModelWithProjection":
        return SDXL
    if "unet" in classes and classes.get("text_encoder") == "CLIPTextModel":
        return SD1
    raise FailedPrecondition(f"pipeline {name or '(unnamed)'!r} is not of a supported model family "
                             f"({', '.join(f.title for f in FAMILIES.values())})")


def detect(folder: Path) -> ModelFamily:
    """The family of a diffusers pipeline folder."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise FailedPrecondition(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    return detect_index(json.loads(path.read_text()))


def of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline (by its config, as saved in model_index.json)."""
    config = dict(getattr(pipe, "config", {}))
    config.setdefault("_class_name", type(pipe).__name__)
    return detect_index(config)


def mismatch(adapter_family: str, base_family: str, what: str = "adapter") -> FailedPrecondition:
    """The error for an artifact of one family used with a base model of another."""
    adapter, base = by_name(adapter_family), by_name(base_family)
    return FailedPrecondition(
        f"{what} was trained for {adapter.title} ({adapter.name}) but the base model is "
        f"{base.title} ({base.name})"
    )
