"""Our one stored LoRA layout, and reading foreign diffusers/PEFT LoRA files into it.

Stored layout (`pytorch_lora_weights.safetensors`, what diffusers' `save_lora_weights`
writes when given adapter metadata):

- tensors `<component>.<module path>.lora_A.weight` / `.lora_B.weight`, component one of
  unet, text_encoder, text_encoder_2; module paths as in the installed diffusers/transformers;
  dtypes exactly as imported (never re-cast);
- header metadata `lora_adapter_metadata`: JSON of the PEFT `LoraConfig` arguments per
  component, flattened as "<component>.<arg>" (r, lora_alpha, rank_pattern, alpha_pattern,
  target_modules, use_rslora). diffusers' `load_lora_weights(path)` builds its LoraConfig
  from exactly this, so per-module alpha/rank scaling survives without being folded into the
  weights: folding (B * alpha/r) would change the float rounding of every LoRA forward and
  break bit-exact equivalence with loading the original file.

A module's scale is alpha/r (alpha/sqrt(r) with use_rslora). A file without metadata means
alpha == r for every module (diffusers' convention).
"""

from __future__ import annotations

import collections
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.errors import InvalidInput
from services.registry.interop.shapes import TEXT_ENCODERS, UNET, BaseModelShapes
from services.registry.interop.validate import check_lora_shapes, require_module

FIELD = "file"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = (UNET, *TEXT_ENCODERS)


@dataclass(frozen=True)
class ModuleLora:
    """One adapted module: A (down) and B (up) weights with its alpha."""

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


def _pattern_value(patterns: dict[str, Any], path: str) -> Any:
    """PEFT's pattern lookup (peft.utils.other.get_pattern_key): first key matching the path's tail."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return None


def _most_common(values: list[Any]) -> Any:
    return collections.Counter(values).most_common(1)[0][0]


def _plain_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def component_config(mods: list[ModuleLora]) -> dict[str, Any]:
    """The LoraConfig kwargs that reproduce each module's rank and alpha exactly."""
    r = _most_common([m.rank for m in mods])
    alpha = _most_common([m.alpha for m in mods])
    return {
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "rank_pattern": {f"^{re.escape(m.path)}": m.rank for m in mods if m.rank != r},
        "alpha_pattern": {f"^{re.escape(m.path)}": _plain_number(m.alpha) for m in mods if m.alpha != alpha},
        "target_modules": sorted(m.path for m in mods),
        "use_rslora": any(m.rslora for m in mods),
        "use_dora": False,
        "lora_bias": False,
    }


def save_stored(mods: list[ModuleLora], path: Path) -> None:
    """Write the stored layout (tensors + lora_adapter_metadata) to `path`."""
    tensors: dict[str, torch.Tensor] = {}
    flat: dict[str, Any] = {}
    for comp in COMPONENTS:
        group = [m for m in mods if m.component == comp]
        if not group:
            continue
        for m in group:
            tensors[f"{comp}.{m.path}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{comp}.{m.path}.lora_B.weight"] = m.up.contiguous()
        flat.update({f"{comp}.{k}": v for k, v in component_config(group).items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}
    save_file(tensors, str(path), metadata=metadata)


def configs_from_metadata(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Split diffusers' flattened lora_adapter_metadata into per-component LoraConfig kwargs."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        raise InvalidInput(FIELD, f"{METADATA_KEY} metadata is not valid JSON") from None
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items() if isinstance(flat, dict) else ():
        comp, _, arg = str(key).partition(".")
        out.setdefault(comp, {})[arg] = value
    return out


def modules_from_peft(
    tensors: dict[str, torch.Tensor], configs: dict[str, dict[str, Any]], originals: dict[str, str] | None = None
) -> list[ModuleLora]:
    """Pair `<comp>.<path>.lora_A/B.weight` tensors and resolve each module's alpha like PEFT does."""
    originals = originals or {}
    mods: list[ModuleLora] = []
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        comp, _, rest = key.partition(".")
        path = rest[: -len(".lora_A.weight")]
        up_key = f"{comp}.{path}.lora_B.weight"
        if up_key not in tensors:
            raise InvalidInput(FIELD, f"{originals.get(key, key)!r} has no matching up/lora_B tensor")
        cfg = configs.get(comp)
        down = tensors[key]
        if cfg is None:
            alpha, rslora = float(down.shape[0]), False
        else:
            if cfg.get("use_dora"):
                raise InvalidInput(FIELD, "DoRA adapters (use_dora) are not supported")
            found = _pattern_value(cfg.get("alpha_pattern") or {}, path)
            alpha = float(found if found is not None else cfg.get("lora_alpha", 8))
            rslora = bool(cfg.get("use_rslora", False))
        mods.append(ModuleLora(comp, path, down, tensors[up_key], alpha, rslora))
    return mods


def load_stored(path: Path) -> list[ModuleLora]:
    """Read a stored-layout file (or any PEFT-keyed diffusers LoRA file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return modules_from_peft(load_file(str(path)), configs_from_metadata(metadata))


def validate_modules(mods: list[ModuleLora], shapes: BaseModelShapes, originals: dict[str, str]) -> None:
    """Every module must exist in the base model with matching widths (first failure wins)."""
    if not mods:
        raise InvalidInput(FIELD, "the file holds no LoRA tensors")
    for m in mods:
        key = originals.get(f"{m.component}.{m.path}.lora_A.weight", f"{m.component}.{m.path}")
        module = require_module(shapes, key, m.component, m.path)
        check_lora_shapes(key, module, tuple(m.down.shape), tuple(m.up.shape), m.component, m.path)
