"""Helpers for the SDXL/Flux interop tests: foreign LoRA files made WITHOUT our interop code.

A "diffusers" file is made the way a diffusers user makes one: PEFT adapters on the tiny
pipeline's denoiser and text encoders with seeded random non-zero weights, written by the
pipeline class's own `save_lora_weights`. kohya / ai-toolkit files are derived from it by
rules spelt out here by hand (the tiny models' sgm numbering, BFL's fused Flux modules), so
a bug in our name tables cannot make an importer test pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

RANK = 4
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
SDXL_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

# Flux: diffusers children of transformer_blocks.{i} that diffusers' own kohya loader reads back.
FLUX_DOUBLE_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                       "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                       "ff_context.net.2", "norm1.linear", "norm1_context.linear")
FLUX_SINGLE_LOADABLE = ("proj_out", "norm.linear")  # linear2, modulation.lin
FLUX_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1 (diffusers asserts 3072 wide)

# Hand-written sgm numbering of the tiny SDXL UNet (layers_per_block 1, [DownBlock2D, CrossAttnDownBlock2D]):
# input_blocks 1 = down 0 resnet, 2 = downsampler, 3 = down 1 resnet + attention; output_blocks 0-1 = up 0.
SDXL_SGM = {
    "down_blocks.1.attentions.0": "input_blocks.3.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
}
FLUX_DOUBLE_BFL = {
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
}
FLUX_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
            "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def load_pipe(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompt: str = "a photo of a red box") -> np.ndarray:
    """Two steps at 32 px, fixed seed: deterministic on CPU (Flux: short T5 sequence)."""
    extra = {"max_sequence_length": 32} if type(pipe).__name__.startswith("Flux") else {}
    g = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, generator=g, output_type="np", height=32, width=32, **extra)
    return np.asarray(out.images)


def _add_lora(model: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """A PEFT LoRA (alpha = rank: scale 1) with seeded non-zero A and B; its PEFT state dict."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False), model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)
    return dict(get_peft_model_state_dict(model))


def _module_names(model: torch.nn.Module, suffixes: tuple[str, ...], under: str = "") -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.startswith(under) and n.endswith(suffixes)]


def flux_targets(pipe: Any, fused_single: bool) -> list[str]:
    """Exact module paths of the tiny Flux transformer (suffixes alone would catch top-level proj_out)."""
    t = pipe.transformer
    names = _module_names(t, FLUX_DOUBLE_TARGETS, "transformer_blocks.")
    singles = FLUX_SINGLE_LOADABLE + (FLUX_SINGLE_FUSED if fused_single else ())
    return names + _module_names(t, singles, "single_transformer_blocks.")


def write_diffusers_lora(family: str, base: Path, out_dir: Path, *, fused_single: bool = False,
                         denoiser_targets: list[str] | None = None) -> Path:
    """`<out_dir>/pytorch_lora_weights.safetensors` written by the pipeline's save_lora_weights."""
    pipe = load_pipe(base)
    layers: dict[str, dict[str, torch.Tensor]] = {
        "text_encoder_lora_layers": _add_lora(pipe.text_encoder, list(TE_TARGETS), 1),
    }
    if family == "sdxl":
        layers["unet_lora_layers"] = _add_lora(pipe.unet, _module_names(pipe.unet, SDXL_UNET_TARGETS), 2)
        layers["text_encoder_2_lora_layers"] = _add_lora(pipe.text_encoder_2, list(TE_TARGETS), 3)
    else:
        targets = denoiser_targets or flux_targets(pipe, fused_single)
        layers["transformer_lora_layers"] = _add_lora(pipe.transformer, targets, 2)
    type(pipe).save_lora_weights(str(out_dir), **layers)
    return out_dir / "pytorch_lora_weights.safetensors"


def _kohya_te(path: str, prefix: str) -> str:
    bare = path.removeprefix("text_model.")
    return prefix + f"text_model.{bare}".replace(".", "_")


def sdxl_to_kohya(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers SDXL keys -> kohya (sgm UNet names, lora_te1_/lora_te2_), alpha = rank."""
    prefixes = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        comp, _, rest = key.partition(".")
        path, _, role = rest.rpartition(".lora_")
        if comp == "unet":
            block = next(b for b in SDXL_SGM if path.startswith(b + "."))
            name = "lora_unet_" + (SDXL_SGM[block] + path[len(block):]).replace(".", "_")
        else:
            name = _kohya_te(path, prefixes[comp])
        out[f"{name}.{'lora_down' if role == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(RANK))
    return out


def _fuse(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """BFL's fused Linear: downs stacked, ups block diagonal (sd-scripts' split_qkv layout)."""
    return torch.cat([a for a, _ in parts]), torch.block_diag(*(b for _, b in parts))


def flux_to_original(sd: dict[str, torch.Tensor], n_double: int, n_single: int) -> dict[str, tuple[Any, Any]]:
    """diffusers Flux transformer keys -> {BFL dotted name: (down, up)} (text encoder left out)."""
    ab = {k.removeprefix("transformer.").removesuffix(".weight"): v for k, v in sd.items()
          if k.startswith("transformer.")}

    def pair(path: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (ab[f"{path}.lora_A"], ab[f"{path}.lora_B"]) if f"{path}.lora_A" in ab else None

    out: dict[str, tuple[Any, Any]] = {}
    for i in range(n_double):
        for bfl, child in FLUX_DOUBLE_BFL.items():
            if (p := pair(f"transformer_blocks.{i}.{child}")) is not None:
                out[f"double_blocks.{i}.{bfl}"] = p
        for bfl, children in FLUX_QKV.items():
            got = [pair(f"transformer_blocks.{i}.{c}") for c in children]
            if all(g is not None for g in got):
                out[f"double_blocks.{i}.{bfl}"] = _fuse(got)  # type: ignore[arg-type]
    for i in range(n_single):
        for bfl, child in (("linear2", "proj_out"), ("modulation.lin", "norm.linear")):
            if (p := pair(f"single_transformer_blocks.{i}.{child}")) is not None:
                out[f"single_blocks.{i}.{bfl}"] = p
        got = [pair(f"single_transformer_blocks.{i}.{c}") for c in FLUX_SINGLE_FUSED]
        if all(g is not None for g in got):
            out[f"single_blocks.{i}.linear1"] = _fuse(got)  # type: ignore[arg-type]
    return out


def flux_to_kohya(sd: dict[str, torch.Tensor], n_double: int, n_single: int) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux layout: lora_unet_<BFL name flattened>, CLIP-L as lora_te1_, alpha = rank."""
    out: dict[str, torch.Tensor] = {}
    pairs = {"lora_unet_" + n.replace(".", "_"): p for n, p in flux_to_original(sd, n_double, n_single).items()}
    for key, value in sd.items():
        if key.startswith("text_encoder."):
            path, _, role = key.removeprefix("text_encoder.").rpartition(".lora_")
            pairs.setdefault(_kohya_te(path, "lora_te1_"), (None, None))
            a, b = pairs[_kohya_te(path, "lora_te1_")]
            pairs[_kohya_te(path, "lora_te1_")] = (value, b) if role == "A.weight" else (a, value)
    for name, (down, up) in pairs.items():
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


def flux_to_mixture(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OneTrainer-style: `lora_transformer_<diffusers path flattened>`, CLIP-L as lora_te1_, alpha = rank."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        comp, _, rest = key.partition(".")
        path, _, role = rest.rpartition(".lora_")
        name = _kohya_te(path, "lora_te1_") if comp == "text_encoder" else "lora_transformer_" + path.replace(".", "_")
        out[f"{name}.{'lora_down' if role == 'A.weight' else 'lora_up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(float(RANK))
    return out


def flux_to_comfy(sd: dict[str, torch.Tensor], n_double: int, n_single: int) -> dict[str, torch.Tensor]:
    """ComfyUI / ai-toolkit ComfyUI-style: `diffusion_model.<BFL name>.lora_A/B.weight`."""
    out: dict[str, torch.Tensor] = {}
    for name, (down, up) in flux_to_original(sd, n_double, n_single).items():
        out[f"diffusion_model.{name}.lora_A.weight"] = down
        out[f"diffusion_model.{name}.lora_B.weight"] = up
    return out


def lora_params(pipe: Any) -> dict[str, torch.Tensor]:
    """Every LoRA parameter a loaded pipeline holds, by component and module path."""
    out: dict[str, torch.Tensor] = {}
    for comp in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        for name, param in model.named_parameters() if model is not None else ():
            if ".lora_" in name:
                out[f"{comp}.{name}"] = param.detach()
    return out


def peft_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same modules and equal tensors, ignoring transformers 4's `text_model.` level in key names."""
    def norm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.replace(".text_model.", "."): v for k, v in sd.items()}

    na, nb = norm(a), norm(b)
    return set(na) == set(nb) and all(torch.equal(na[k].float(), nb[k].float()) for k in na)
