"""Diffusers UNet module paths <-> the original (LDM/sgm) Stable Diffusion module paths.

The original CompVis/Stability code flattens the UNet into `input_blocks.N.M`,
`middle_block.M` and `output_blocks.N.M`, numbering resnets, attentions and resamplers in
the order they run. kohya sd-scripts names SDXL LoRA modules this way, and A1111/ComfyUI
single-file checkpoints store the whole UNet this way. The numbering depends on the UNet
config (layers per block, which blocks have attention, where resamplers sit), so the map is
computed from the config rather than hard-coded for SD1.5/SDXL.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import FailedPrecondition

# ResnetBlock2D children, diffusers -> LDM.
RESNET_CHILDREN = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers(cfg: dict[str, Any], i: int) -> int:
    lpb = cfg.get("layers_per_block", 2)
    return int(lpb[i] if isinstance(lpb, list | tuple) else lpb)


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or "Attn" in block_type


def block_prefix_map(cfg: dict[str, Any]) -> dict[str, str]:
    """Map diffusers block prefixes (e.g. "down_blocks.1.attentions.0") to LDM ones.

    Resnet prefixes map to the resnet container ("input_blocks.4.0"); their children are
    renamed with RESNET_CHILDREN. Resampler entries map the conv itself.
    """
    out: dict[str, str] = {}
    down = list(cfg.get("down_block_types", []))
    idx = 1
    for i, kind in enumerate(down):
        for j in range(_layers(cfg, i)):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            if _has_attention(kind):
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    up = list(cfg.get("up_block_types", []))
    idx = 0
    for i, kind in enumerate(up):
        n = _layers(cfg, len(up) - 1 - i) + 1
        attn = _has_attention(kind)
        for j in range(n):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            if attn:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if j == n - 1 and i < len(up) - 1:
                out[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if attn else 1}.conv"
            idx += 1
    return out


class UnetNameMap:
    """Translate full module paths both ways for one UNet config."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self._blocks = block_prefix_map(cfg)
        self._blocks.update(_TOP_LEVEL)
        self._inverse = {v: k for k, v in self._blocks.items()}
        self._resnet_inverse = {v: k for k, v in RESNET_CHILDREN.items()}

    def to_ldm(self, path: str) -> str:
        """"down_blocks.1.attentions.0.proj_in" -> "input_blocks.4.1.proj_in"."""
        parts = path.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in self._blocks:
                rest = parts[n:]
                if ".resnets." in f".{head}." and rest:
                    child = RESNET_CHILDREN.get(rest[0])
                    if child is None:
                        break
                    rest = [child, *rest[1:]]
                return ".".join([self._blocks[head], *rest])
        raise FailedPrecondition(f"UNet module {path!r} has no original Stable Diffusion name", "file")

    def to_diffusers(self, ldm_path: str) -> str | None:
        """Inverse of to_ldm; None when the path is not a known LDM module."""
        parts = ldm_path.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in self._inverse:
                base = self._inverse[head]
                rest = parts[n:]
                if ".resnets." in f".{base}." and rest:
                    for m in (2, 1):
                        child = self._resnet_inverse.get(".".join(rest[:m]))
                        if child is not None:
                            return ".".join([base, child, *rest[m:]])
                    return None
                return ".".join([base, *rest])
        return None
