"""SD 1.x/2.x key maps for foreign adapter formats (kohya sd-scripts, A1111, ComfyUI).

kohya trains SD 1.x/2.x on a diffusers-shaped UNet, so its `lora_unet_` names are diffusers
module paths flattened with "_"; files converted from original (LDM) checkpoints use the
LDM numbering (`input_blocks_4_1_...`), which is read as well. SD 2.x differs from SD 1.x
only in its OpenCLIP text encoder (kept as a sub-architecture, "sd2", for metadata and
single-file checkpoints).

Everything here is plain data over module paths: the registry's interop package passes in the
module list and the diffusers -> original name translation (it owns the UNet numbering).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

KohyaGroup = tuple[tuple[str, ...], tuple[str, ...], bool]
"""(original names, first one written; diffusers paths it covers, in fused order; whether
the up rows' two halves are swapped between the layouts)."""

LORA_COMPONENTS = ("unet", "text_encoder")
ORIGINAL_PREFIXES: tuple[str, ...] = ()  # PEFT-keyed files with original names: none for SD
SINGLE_FILE_CHECKPOINT = True

_SPEC = {
    "sd1": {"base_model_version": "sd_v1", "architecture": "stable-diffusion-v1", "implementation": "diffusers",
            "network_module": "networks.lora"},
    "sd2": {"base_model_version": "sd_v2", "architecture": "stable-diffusion-v2-512", "implementation": "diffusers",
            "network_module": "networks.lora"},
}


def kohya_groups(paths: Iterable[str], original_name: Callable[[str], str | None]) -> list[KohyaGroup]:
    """One group per UNet module: diffusers-style name first, the LDM spelling as an alias."""
    groups: list[KohyaGroup] = []
    for path in paths:
        ldm = original_name(path)
        names = (path, ldm) if ldm and ldm != path else (path,)
        groups.append((names, (path,), False))
    return groups


def spec(architecture: str) -> dict[str, str]:
    """kohya `ss_base_model_version` and ModelSpec architecture/implementation of a sub-architecture."""
    return dict(_SPEC.get(architecture, _SPEC["sd1"]))
