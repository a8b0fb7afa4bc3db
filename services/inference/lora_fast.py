"""Fast attach: a plain LoRA whose target layers are already peft-wrapped skips peft's injection.

diffusers' `load_lora_into_*` -> peft `inject_adapter` walks the whole module tree several
times per call (measured ~130-210 ms per LoRA on the tiny model's ~300 modules under load, and
it grows with the model), although for the common case, a LoRA with the same targets as the
adapters already attached, there is nothing to discover: every target is a `lora.Linear`
wrapper already. Then we do what injection would have done, per layer, with peft's own layer
API (`update_layer`, same scaling rule) and copy A and B in. The result is the same peft
adapter (same parameters, dtype, scaling), so merging it is bit-identical to the slow path;
tests check this against diffusers for adapters attached second.

Only the plain case takes this path: Linear targets, one rank, no DoRA / rsLoRA / bias / per-
module alpha patterns, no kohya-style alphas. Anything else returns False and the caller uses
diffusers' full loader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from peft import LoraConfig
from peft.tuners.lora import Linear as LoraLinear

Groups = dict[str, dict[str, torch.Tensor]]  # module path -> {"A": tensor, "B": tensor}
_PLAIN_FORBIDDEN = ("rank_pattern", "alpha_pattern", "use_dora", "use_rslora", "lora_bias")


def _component_state(converted: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    sub = {k[len(prefix) + 1:]: v for k, v in converted.items() if k.startswith(prefix + ".")}
    if not sub:
        return {}
    if prefix in ("unet", "transformer"):  # denoisers: diffusers' own module names, peft or old keys
        return convert_unet_state_dict_to_peft(sub)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))


def _groups(peft_state: dict[str, torch.Tensor]) -> Groups | None:
    groups: Groups = {}
    for key, tensor in peft_state.items():
        for marker, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if key.endswith(marker):
                groups.setdefault(key[: -len(marker)], {})[slot] = tensor
                break
        else:
            return None  # magnitude vectors, biases, alphas...: not the plain case
    if any(len(pair) != 2 or pair["A"].dim() != 2 or pair["B"].dim() != 2 for pair in groups.values()):
        return None
    return groups


def _alpha(groups: Groups, metadata: dict[str, Any] | None, prefix: str) -> tuple[int, float] | None:
    ranks = {pair["A"].shape[0] for pair in groups.values()}
    if len(ranks) != 1:
        return None
    rank = ranks.pop()
    if metadata is None:
        return rank, float(rank)  # diffusers' rule without a header: alpha == rank
    config = {k[len(prefix) + 1:]: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    if not config or any(config.get(k) for k in _PLAIN_FORBIDDEN) or config.get("r", rank) != rank:
        return None
    return rank, float(config.get("lora_alpha", rank))


def plan(component: torch.nn.Module, wrappers: dict[str, Any], converted: dict[str, torch.Tensor],
         prefix: str, metadata: dict[str, Any] | None) -> tuple[Groups, int, float] | None:
    """What to add to `component` (path -> A/B, rank, alpha), or None when not the plain case."""
    groups = _groups(_component_state(converted, prefix))
    if groups is None:
        return None
    if not groups:
        return {}, 0, 0.0
    rank_alpha = _alpha(groups, metadata, prefix)
    if rank_alpha is None:
        return None
    for path, pair in groups.items():
        layer = wrappers.get(path)
        if not isinstance(layer, LoraLinear) or getattr(layer, "fan_in_fan_out", False):
            return None
        if pair["A"].shape[1] != layer.in_features or pair["B"].shape[0] != layer.out_features:
            return None
    return groups, rank_alpha[0], rank_alpha[1]


def add_adapter(component: torch.nn.Module, wrappers: dict[str, Any], name: str, groups: Groups,
                rank: int, alpha: float) -> None:
    """Create adapter `name` in each wrapper of `groups` and copy its A and B in."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False,  # type: ignore[arg-type]
                        target_modules=sorted(groups))
    for path, pair in groups.items():
        layer = wrappers[path]
        dtype = _adapter_dtype(layer)
        layer.update_layer(name, rank, lora_alpha=alpha, config=config)
        device = layer.get_base_layer().weight.device
        for module, tensor in ((layer.lora_A[name], pair["A"]), (layer.lora_B[name], pair["B"])):
            module.weight = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    peft_config = getattr(component, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config[name] = config


def _adapter_dtype(layer: Any) -> torch.dtype:
    """The dtype peft gave the adapters already in this layer (it may upcast fp16 bases to fp32)."""
    for existing in layer.lora_A.values():
        return existing.weight.dtype  # type: ignore[no-any-return]
    return layer.get_base_layer().weight.dtype  # type: ignore[no-any-return]


def try_fast_attach(components: Sequence[tuple[str, torch.nn.Module, dict[str, Any]]], name: str,
                    converted: dict[str, torch.Tensor], metadata: dict[str, Any] | None) -> bool:
    """Attach via the per-layer path when every component is the plain case; False otherwise.

    `components` are (prefix, module, path -> wrapper) of the pipeline's LoRA-capable parts;
    `converted` is the LoRA in diffusers' layout (the family's `lora_state_dict`, no kohya
    alphas). Nothing is modified unless every component qualifies.
    """
    plans = []
    known = {prefix for prefix, _m, _w in components}
    if any(key.split(".", 1)[0] not in known for key in converted):
        return False
    for prefix, module, wrappers in components:
        planned = plan(module, wrappers, converted, prefix, metadata)
        if planned is None:
            return False
        plans.append((module, wrappers, planned))
    if not any(groups for _m, _w, (groups, _r, _a) in plans):
        return False
    for module, wrappers, (groups, rank, alpha) in plans:
        if groups:
            add_adapter(module, wrappers, name, groups, rank, alpha)
    return True
