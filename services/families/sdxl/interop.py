"""SDXL key maps for foreign adapter formats (kohya sd-scripts, A1111, ComfyUI).

kohya trains SDXL on the original (sgm) UNet, so its `lora_unet_` names use the sgm numbering
(`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); diffusers-style names are read as an
alias. The two CLIP encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (OpenCLIP bigG); those
prefixes are family facts in services/families/sdxl/__init__.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

KohyaGroup = tuple[tuple[str, ...], tuple[str, ...], bool]
"""(original names, first one written; diffusers paths it covers; halves swapped)."""

LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ORIGINAL_PREFIXES: tuple[str, ...] = ()
SINGLE_FILE_CHECKPOINT = True


def kohya_groups(paths: Iterable[str], original_name: Callable[[str], str | None]) -> list[KohyaGroup]:
    """One group per UNet module: the sgm name first (what kohya writes), diffusers-style as an alias."""
    groups: list[KohyaGroup] = []
    for path in paths:
        sgm = original_name(path)
        names = (sgm, path) if sgm and sgm != path else (path,)
        groups.append((names, (path,), False))
    return groups


def spec(architecture: str) -> dict[str, str]:
    return {
        "base_model_version": "sdxl_base_v1-0",
        "architecture": "stable-diffusion-xl-v1-base",
        "implementation": "https://github.com/Stability-AI/generative-models",
        "network_module": "networks.lora",
    }
