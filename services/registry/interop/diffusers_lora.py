"""Foreign diffusers-family LoRA files -> our stored layout.

Three key spellings are in circulation:
- PEFT (diffusers >= 0.24): `unet.<module>.lora_A.weight` / `lora_B` (Flux: `transformer.`;
  ai-toolkit writes this too, and some tools put diffusers names under the family's original
  prefixes, `diffusion_model.`, which are read as the denoiser);
- diffusers "old": `unet.<module>.lora.down.weight` / `lora.up`, text encoders
  `...q_proj.lora_linear_layer.down.weight`;
- attention processors (`unet.save_attn_procs`, often without the `unet.` prefix):
  `<block>.attn1.processor.to_q_lora.down.weight`, text encoders `self_attn.to_q_lora.down`.
All are renamed to PEFT keys of the modules in *this* base model (e.g. the `text_model.`
level that transformers 5 dropped is removed), keeping a map back to the user's key names
for error messages. Alphas come from `lora_adapter_metadata` when present, else from
`<module>.alpha` scalars (kohya semantics: 0 means "= rank"), else alpha == rank.
"""

from __future__ import annotations

import re

import torch

from services.common.errors import InvalidInput
from services.registry.interop.lora_layout import (
    ModuleLora,
    configs_from_metadata,
    modules_from_peft,
    validate_modules,
)
from services.registry.interop.shapes import BaseModelShapes

FIELD = "file"

_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}

_PATTERNS = (
    re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>A|B)\.weight$"),
    re.compile(r"^(?P<mod>.+)\.lora\.(?P<ab>down|up)\.weight$"),
    re.compile(r"^(?P<mod>.+)\.lora_linear_layer\.(?P<ab>down|up)\.weight$"),
    re.compile(r"^(?P<parent>.+?)(\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ab>down|up)\.weight$"),
)
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")


def _split_component(key: str, shapes: BaseModelShapes, originals: tuple[str, ...]) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in shapes.model_family.components and rest:
        return head, rest
    for prefix in originals:
        if key.startswith(prefix):
            return shapes.denoiser, key[len(prefix):]
    return shapes.denoiser, key  # attn-procs files saved without a prefix are denoiser-only


def _te_path(path: str, comp: str, shapes: BaseModelShapes) -> str:
    """Translate between transformers 4 ("text_model.encoder...") and 5 ("encoder...") paths."""
    if comp == shapes.denoiser:
        return path
    table = shapes.modules.get(comp, {})
    bare = path.removeprefix("text_model.")
    for candidate in (path, bare, f"text_model.{bare}"):
        if candidate in table:
            return candidate
    return path


def _module_and_role(rest: str, comp: str, denoiser: str) -> tuple[str, str] | None:
    for pattern in _PATTERNS:
        m = pattern.match(rest)
        if not m:
            continue
        role = "A" if m.group("ab") in ("A", "down") else "B"
        if "proj" in m.groupdict() and m.group("proj"):
            table = _UNET_PROJ if comp == denoiser else _TE_PROJ
            return f"{m.group('parent')}.{table[m.group('proj')]}", role
        return m.group("mod"), role
    return None


def normalise(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], shapes: BaseModelShapes,
    original_prefixes: tuple[str, ...] = (),
) -> list[ModuleLora]:
    """Rename, pair, resolve alphas and validate against the base model."""
    peft: dict[str, torch.Tensor] = {}
    originals: dict[str, str] = {}
    alphas: dict[str, float] = {}
    for key in sorted(tensors):
        comp, rest = _split_component(key, shapes, original_prefixes)
        alpha_match = _ALPHA.match(rest)
        if alpha_match:
            alphas[f"{comp}.{_te_path(alpha_match.group('mod'), comp, shapes)}"] = float(tensors[key].item())
            continue
        found = _module_and_role(rest, comp, shapes.denoiser)
        if found is None:
            raise InvalidInput(FIELD, f"{key!r} is not a LoRA tensor of a known diffusers/PEFT layout")
        module, role = found
        new_key = f"{comp}.{_te_path(module, comp, shapes)}.lora_{role}.weight"
        if new_key in peft:
            raise InvalidInput(FIELD, f"{key!r} duplicates {originals[new_key]!r}")
        peft[new_key] = tensors[key]
        originals[new_key] = key
    configs = configs_from_metadata(metadata)
    mods = modules_from_peft(peft, configs, originals)
    if alphas and not configs:
        mods = [_with_alpha(m, alphas.get(f"{m.component}.{m.path}")) for m in mods]
    validate_modules(mods, shapes, originals)
    return mods


def _with_alpha(m: ModuleLora, alpha: float | None) -> ModuleLora:
    if not alpha:  # missing or 0: kohya's "alpha = rank"
        return m
    return ModuleLora(m.component, m.path, m.down, m.up, alpha, m.rslora)
