"""Flux key maps for foreign adapter formats: Black Forest Labs' original module names.

kohya sd-scripts (and ComfyUI, and ai-toolkit's ComfyUI-style files) name Flux LoRA modules
after BFL's reference implementation, not diffusers: `double_blocks.{i}.img_attn.qkv`,
`single_blocks.{i}.linear1`, ... kohya flattens them with "_" under `lora_unet_`; other tools
keep the dots under `diffusion_model.` with PEFT's lora_A/lora_B. Several of those modules
are fused in BFL's code where diffusers keeps separate Linears:

- double blocks: `img_attn.qkv` = attn.to_q|to_k|to_v, `txt_attn.qkv` = attn.add_q|k|v_proj;
- single blocks: `linear1` = attn.to_q|to_k|to_v|proj_mlp (rows in that order);
- the final AdaLayerNorm's projection emits (shift, scale) in BFL but (scale, shift) in
  diffusers, so its up rows swap halves.

A group lists the diffusers paths one original module covers, in the fused row order; the
registry's interop package splits and fuses the LoRA tensors by it. The CLIP-L encoder is
`lora_te1_`; LoRA on the T5 encoder is not supported (diffusers cannot load it either).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

KohyaGroup = tuple[tuple[str, ...], tuple[str, ...], bool]
"""(original names, first one written; diffusers paths it covers, in fused order; halves swapped)."""

LORA_COMPONENTS = ("transformer", "text_encoder")
ORIGINAL_PREFIXES = ("diffusion_model.", "base_model.model.")
SINGLE_FILE_CHECKPOINT = False

_DOUBLE = {  # BFL child of double_blocks.{i} -> diffusers children of transformer_blocks.{i}
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
}
_SINGLE = {  # BFL child of single_blocks.{i} -> diffusers children of single_transformer_blocks.{i}
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SWAPPED = frozenset({"final_layer.adaLN_modulation.1"})


def _indices(paths: set[str], container: str) -> list[int]:
    pattern = re.compile(rf"^{container}\.(\d+)\.")
    return sorted({int(m.group(1)) for p in paths if (m := pattern.match(p))})


def kohya_groups(paths: Iterable[str], original_name: Callable[[str], str | None]) -> list[KohyaGroup]:
    """Every BFL module of this transformer whose diffusers parts all exist (block counts come
    from the module list, so any depth works: 19/38 for Flux.1, fewer for small variants)."""
    del original_name  # the UNet numbering does not apply to a transformer
    present = set(paths)
    candidates: list[tuple[str, tuple[str, ...]]] = [(bfl, (diffusers,)) for bfl, diffusers in _TOP.items()]
    for i in _indices(present, "transformer_blocks"):
        candidates += [(f"double_blocks.{i}.{b}", tuple(f"transformer_blocks.{i}.{p}" for p in parts))
                       for b, parts in _DOUBLE.items()]
    for i in _indices(present, "single_transformer_blocks"):
        candidates += [(f"single_blocks.{i}.{b}", tuple(f"single_transformer_blocks.{i}.{p}" for p in parts))
                       for b, parts in _SINGLE.items()]
    return [((bfl,), parts, bfl in _SWAPPED) for bfl, parts in candidates if all(p in present for p in parts)]


def spec(architecture: str) -> dict[str, str]:
    return {
        "base_model_version": "flux1",
        "architecture": "flux-1-dev",
        "implementation": "https://github.com/black-forest-labs/flux",
        "network_module": "networks.lora_flux",
    }
