"""Our one stored LoRA layout, and reading PEFT-keyed LoRA files into modules.

Stored layout (`pytorch_lora_weights.safetensors`, the keys diffusers' `save_lora_weights`
writes): tensors `<component>.<module path>.lora_A.weight` / `.lora_B.weight`, component one
of unet, text_encoder, text_encoder_2, module paths as in the installed diffusers and
transformers. Every module's scale is 1 (alpha == rank): a foreign alpha/rank scale s is
folded into lora_B (B' = s * B, computed in float32, kept in the file's dtype when that is
lossless, else stored as float32). No `lora_adapter_metadata` is needed, so the file means
the same to every loader, including `load_lora_weights(state_dict)` from memory, which the
inference cache uses and which ignores file metadata.

Exactness: PEFT computes (B(Ax))*s; with s a power of two (kohya's usual alpha=1 or
alpha=rank/2 with power-of-two ranks, PEFT's alpha=2*rank, ...) scaling by s commutes with
every float rounding, so (s*B)(Ax) is bit-identical on CPU, fused or not. Other scales
differ by float rounding only (about 1e-7 relative).

Reading: a module's scale is alpha/r (alpha/sqrt(r) with use_rslora); alphas come from
`lora_adapter_metadata` (PEFT LoraConfig arguments, diffusers' convention) when present,
else alpha == r.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from services.common.errors import InvalidInput
from services.registry.interop.shapes import BaseModelShapes
from services.registry.interop.validate import check_lora_shapes, require_module

FIELD = "file"
METADATA_KEY = "lora_adapter_metadata"
LAYOUT = "peft keys; alpha/rank scale folded into lora_B (every module alpha == rank)"


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


def folded_up(m: ModuleLora) -> torch.Tensor:
    """lora_B with the module's scale folded in (unchanged when the scale is 1)."""
    if m.scale == 1.0:
        return m.up.contiguous()
    folded = m.up.to(torch.float32) * m.scale
    narrowed = folded.to(m.up.dtype)
    return narrowed if torch.equal(narrowed.to(torch.float32), folded) else folded


def save_stored(mods: list[ModuleLora], path: Path) -> None:
    """Write the stored layout: PEFT keys, scales folded into lora_B."""
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        tensors[f"{m.component}.{m.path}.lora_A.weight"] = m.down.contiguous()
        tensors[f"{m.component}.{m.path}.lora_B.weight"] = folded_up(m)
    save_file(tensors, str(path), metadata={"format": "pt", "atelier.lora_layout": LAYOUT})


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
