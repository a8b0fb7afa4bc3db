"""Diffusers pipeline weights -> one original-layout Stable Diffusion checkpoint.

A1111, ComfyUI and most model sites expect a single `.safetensors` with the CompVis/sgm key
layout: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder(s)
under `cond_stage_model.*` (SD1.x: HF CLIP, SD2.x: OpenCLIP) or `conditioner.embedders.N.*`
(SDXL: HF CLIP + OpenCLIP bigG). diffusers only reads this layout, so the writer is ours;
it is the inverse of diffusers' `from_single_file` conversion and is checked against it.
Tensors are copied unchanged (dtype kept); only names and, for the VAE attention and
OpenCLIP q/k/v, shapes change.
"""

from __future__ import annotations

import re

import torch

from services.common.errors import FailedPrecondition
from services.registry.interop.ldm_names import UnetNameMap
from services.registry.interop.shapes import ARCH_SD2, ARCH_SDXL

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_VAE_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.conv_shortcut\.", r"\1.mid.block_R\2.nin_shortcut."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", r"\1.mid.block_R\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    )
)
_VAE_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0\.conv)\.(conv_shortcut\.)?")


def _vae_key(key: str, n_up: int) -> str:
    m = _VAE_UP.match(key)
    if m:
        block = n_up - 1 - int(m.group(1))
        inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample.conv"
        short = "nin_shortcut." if m.group(4) else ""
        return f"decoder.up.{block}.{inner}.{short}{key[m.end():]}"
    for pattern, repl in _VAE_RULES:
        if pattern.match(key):
            out = pattern.sub(repl, key, count=1)
            return re.sub(r"block_R(\d+)", lambda g: f"block_{int(g.group(1)) + 1}", out)
    return key


def convert_vae(state: dict[str, torch.Tensor], n_up_blocks: int) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL -> `first_stage_model.*` (mid attention linears become 1x1 convs)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _vae_key(key, n_up_blocks)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[VAE_PREFIX + new] = value
    return out


def convert_unet(state: dict[str, torch.Tensor], unet_config: dict[str, object]) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel -> `model.diffusion_model.*`."""
    names = UnetNameMap(dict(unet_config))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        out[f"{UNET_PREFIX}{names.to_ldm(module)}.{leaf}"] = value
    return out


def _hf_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 CLIPTextModel keys lack the `text_model.` level every checkpoint has."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("text_model.", "text_projection.")):
            out[key] = value
        else:
            out[f"text_model.{key}"] = value
    return out


def convert_hf_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text encoder -> `<prefix>transformer.text_model.*` (SD1.x, SDXL encoder 0)."""
    return {f"{prefix}transformer.{k}": v for k, v in _hf_clip_keys(state).items() if "position_ids" not in k}


_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def convert_open_clip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP(WithProjection) -> OpenCLIP `<prefix>model.*` (SD2.x, SDXL encoder 1): q/k/v fused."""
    s = _hf_clip_keys(state)
    base = "text_model."
    out = {
        f"{prefix}model.token_embedding.weight": s[f"{base}embeddings.token_embedding.weight"],
        f"{prefix}model.positional_embedding": s[f"{base}embeddings.position_embedding.weight"],
        f"{prefix}model.ln_final.weight": s[f"{base}final_layer_norm.weight"],
        f"{prefix}model.ln_final.bias": s[f"{base}final_layer_norm.bias"],
    }
    if "text_projection.weight" in s:
        out[f"{prefix}model.text_projection"] = s["text_projection.weight"].T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in s if k.startswith(f"{base}encoder.layers.")})
    for i in layers:
        src, dst = f"{base}encoder.layers.{i}.", f"{prefix}model.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [s[f"{src}self_attn.{p}_proj.{leaf}"] for p in ("q", "k", "v")]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv, dim=0).contiguous()
            for hf, oc in _OPENCLIP_LAYER.items():
                out[f"{dst}{oc}.{leaf}"] = s[f"{src}{hf}.{leaf}"]
    return out


def convert_text_encoders(
    architecture: str, te: dict[str, torch.Tensor], te2: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Text encoder(s) in the layout of the architecture's original checkpoints."""
    if architecture == ARCH_SDXL:
        if te2 is None:
            raise FailedPrecondition("an SDXL pipeline needs text_encoder_2 for a single-file checkpoint", "ref")
        return {**convert_hf_clip(te, "conditioner.embedders.0."),
                **convert_open_clip(te2, "conditioner.embedders.1.")}
    if architecture == ARCH_SD2:
        return convert_open_clip(te, "cond_stage_model.")
    return convert_hf_clip(te, "cond_stage_model.")
