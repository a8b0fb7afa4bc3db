"""kohya sd-scripts LoRA (read by A1111 and ComfyUI) <-> our stored layout.

kohya names a module by flattening its path with "_": `lora_unet_<path>`, `lora_te_<path>`
(SD1.x/2.x text encoder), `lora_te1_`/`lora_te2_` (SDXL's two text encoders), each with
`.lora_down.weight` (= PEFT lora_A), `.lora_up.weight` (= lora_B) and an optional scalar
`.alpha`. SD1.x UNet paths use diffusers names (sd-scripts trains on a diffusers-shaped
UNet); SDXL UNet paths use the original sgm names (`input_blocks_4_1_...`), and text-encoder
paths keep transformers 4's `text_model.` level.

"_" flattening is not reversible by string rules, so both directions go through a table
built from the base model's real module list: every LoRA-targetable module's kohya name(s)
-> (component, path). An unknown name is therefore exactly "this base model has no such
module" and is refused with FAILED_PRECONDITION.

Scaling follows kohya: scale = alpha / rank; a missing alpha or alpha == 0 means alpha = rank.
The alpha is kept per module (see lora_layout), never folded into the weights.
"""

from __future__ import annotations

import collections
import json
import math
from datetime import UTC, datetime
from functools import lru_cache

import torch

from services.common.errors import FailedPrecondition, InvalidInput
from services.registry.interop.ldm_names import UnetNameMap
from services.registry.interop.lora_layout import ModuleLora
from services.registry.interop.shapes import (
    ARCH_SD2,
    ARCH_SDXL,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    BaseModelShapes,
)
from services.registry.interop.validate import check_lora_shapes, unknown_module

FIELD = "file"
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

BASE_MODEL_VERSION = {ARCH_SDXL: "sdxl_base_v1-0", ARCH_SD2: "sd_v2"}
MODELSPEC_ARCH = {ARCH_SDXL: "stable-diffusion-xl-v1-base", ARCH_SD2: "stable-diffusion-v2-512"}


def _te_prefixes(shapes: BaseModelShapes) -> dict[str, tuple[str, ...]]:
    """kohya prefixes per text encoder; the first is the one we write."""
    if shapes.is_sdxl:
        return {TEXT_ENCODER: ("lora_te1_", "lora_te_"), TEXT_ENCODER_2: ("lora_te2_",)}
    return {TEXT_ENCODER: ("lora_te_", "lora_te1_")}


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _kohya_te_path(path: str) -> str:
    """kohya keeps transformers 4's `text_model.` level (absent in transformers 5 CLIPTextModel)."""
    return path if path.startswith("text_model.") or path == "text_projection" else f"text_model.{path}"


def _unet_names(shapes: BaseModelShapes, path: str, names: UnetNameMap) -> list[str]:
    """kohya names of a UNet module, the one we export first."""
    diffusers_style = f"lora_unet_{_flat(path)}"
    try:
        sgm_style = f"lora_unet_{_flat(names.to_ldm(path))}"
    except FailedPrecondition:
        return [diffusers_style]
    return [sgm_style, diffusers_style] if shapes.is_sdxl else [diffusers_style, sgm_style]


@lru_cache(maxsize=16)
def _tables(shapes: BaseModelShapes) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, str], str]]:
    """(kohya name -> (component, path), (component, path) -> the kohya name we export)."""
    to_module: dict[str, tuple[str, str]] = {}
    to_name: dict[tuple[str, str], str] = {}
    names = UnetNameMap(shapes.unet_config)
    for path in shapes.modules[UNET]:
        candidates = _unet_names(shapes, path, names)
        to_name[(UNET, path)] = candidates[0]
        for c in candidates:
            to_module.setdefault(c, (UNET, path))
    for comp, prefixes in _te_prefixes(shapes).items():
        for path in shapes.modules.get(comp, {}):
            flat = _flat(_kohya_te_path(path))
            to_name[(comp, path)] = prefixes[0] + flat
            for prefix in prefixes:
                to_module.setdefault(prefix + flat, (comp, path))
    return to_module, to_name


def _component_of(name: str) -> str:
    if name.startswith("lora_unet_"):
        return UNET
    return TEXT_ENCODER_2 if name.startswith("lora_te2_") else TEXT_ENCODER


def import_kohya(tensors: dict[str, torch.Tensor], shapes: BaseModelShapes) -> list[ModuleLora]:
    """kohya state dict -> validated modules of the stored layout (first bad key named)."""
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for key in sorted(tensors):
        name, _, suffix = key.partition(".")
        if suffix not in _ROLE:
            raise InvalidInput(FIELD, f"kohya LoRA key {key!r} is not a lora_down/lora_up/alpha tensor")
        groups[name][_ROLE[suffix]] = key
    to_module, _ = _tables(shapes)
    mods: list[ModuleLora] = []
    for name in sorted(groups):
        group = groups[name]
        if "down" not in group or "up" not in group:
            raise InvalidInput(FIELD, f"kohya LoRA module {name!r} needs both lora_down and lora_up weights")
        down, up = tensors[group["down"]], tensors[group["up"]]
        target = to_module.get(name)
        if target is None:
            raise unknown_module(shapes, group["down"], _component_of(name), name)
        comp, path = target
        rank = check_lora_shapes(group["down"], shapes.modules[comp][path], tuple(down.shape),
                                 tuple(up.shape), comp, path)
        alpha = float(tensors[group["alpha"]].item()) if "alpha" in group else 0.0
        mods.append(ModuleLora(comp, path, down, up, alpha if alpha else float(rank)))
    if not mods:
        raise InvalidInput(FIELD, "the file holds no LoRA tensors")
    return mods


def _kohya_alpha(m: ModuleLora) -> torch.Tensor:
    """kohya scale is alpha/rank; rsLoRA's alpha/sqrt(rank) becomes alpha*sqrt(rank)/rank."""
    alpha = m.alpha * math.sqrt(m.rank) if m.rslora else m.alpha
    as_f32 = torch.tensor(alpha, dtype=torch.float32)
    return as_f32 if float(as_f32.item()) == alpha else torch.tensor(alpha, dtype=torch.float64)


def export_kohya(
    mods: list[ModuleLora], shapes: BaseModelShapes, title: str, description: str = "", trigger: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stored modules -> (kohya tensors, ss_* and modelspec.* metadata)."""
    _, to_name = _tables(shapes)
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        name = to_name.get((m.component, m.path))
        if name is None:
            raise FailedPrecondition(f"{m.component}.{m.path}: not a module of base model {shapes.name!r}", "ref")
        tensors[f"{name}.lora_down.weight"] = m.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = m.up.contiguous()
        tensors[f"{name}.alpha"] = _kohya_alpha(m)
    return tensors, kohya_metadata(mods, shapes, title, description, trigger)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def kohya_metadata(
    mods: list[ModuleLora], shapes: BaseModelShapes, title: str, description: str, trigger: str
) -> dict[str, str]:
    """The sd-scripts/ModelSpec header fields A1111, ComfyUI and civitai display and check."""
    linear = [m for m in mods if m.down.ndim == 2 or tuple(m.down.shape[2:]) == (1, 1)]
    conv = [m for m in mods if m not in linear]
    main = linear or conv
    dim = collections.Counter(m.rank for m in main).most_common(1)[0][0]
    alpha = collections.Counter(float(_kohya_alpha(m).item()) for m in main).most_common(1)[0][0]
    arch = shapes.architecture
    resolution = shapes.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": _num(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION.get(arch, "sd_v1"),
        "ss_v2": str(arch == ARCH_SD2),
        "ss_output_name": title,
        "ss_training_comment": description or f"exported by Atelier ({title})",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCH.get(arch, 'stable-diffusion-v1')}/lora",
        "modelspec.implementation": (
            "https://github.com/Stability-AI/generative-models" if arch == ARCH_SDXL else "diffusers"
        ),
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(UTC).date().isoformat(),
    }
    if conv:
        conv_alpha = float(_kohya_alpha(conv[0]).item())
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": _num(conv_alpha)})
    if description:
        meta["modelspec.description"] = description
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    return meta
