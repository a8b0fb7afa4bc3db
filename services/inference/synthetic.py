"""Random adapters in the trainers' artifact layouts, for tests, benchmarks and smoke checks.

These follow the same file layouts the trainers publish, produced by an independent path:
* LoRA: peft `LoraConfig` on the base UNet (and optionally the text encoder) for the key
  layout, random non-zero A and B, converted with `convert_state_dict_to_diffusers` and written
  by `StableDiffusionPipeline.save_lora_weights` -> `pytorch_lora_weights.safetensors`.
* Textual Inversion: `learned_embeds.safetensors` = {token: tensor[num_vectors, dim]}.
* DreamBooth: perturbed copies of the base components, `save_pretrained` into `unet/` (and
  `text_encoder/`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file
from transformers import CLIPTextModel

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _config(rank: int, targets: Sequence[str]) -> LoraConfig:
    # alpha = 2 * rank, written to the file header like the trainer does: a loader that ignores
    # the header (and so assumes alpha = rank) applies these LoRAs at half strength.
    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets))


def _peft_shapes(model: torch.nn.Module, rank: int, targets: Sequence[str]) -> dict[str, torch.Size]:
    # peft's own injection: transformers 5's `add_adapter` wants a newer peft than diffusers pins.
    inject_adapter_in_model(_config(rank, targets), model)
    state = get_peft_model_state_dict(model)
    return {k: v.shape for k, v in convert_state_dict_to_diffusers(state).items()}


class LoraFactory:
    """Random LoRAs with one key layout per base pipeline (built once, then cheap)."""

    def __init__(self, pipeline_dir: Path, rank: int = 4, text_encoder: bool = False) -> None:
        self.rank = rank
        self.text_encoder = text_encoder
        unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
        self.unet_shapes = _peft_shapes(unet, rank, UNET_TARGETS)
        self.text_shapes: dict[str, torch.Size] = {}
        if text_encoder:
            te = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")
            self.text_shapes = _peft_shapes(te, rank, TEXT_TARGETS)

    @staticmethod
    def _random(shapes: dict[str, torch.Size], gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
        out = {}
        for key, shape in shapes.items():
            std = scale if ("up" in key or "lora_B" in key) else 0.3
            out[key] = torch.randn(shape, generator=gen) * std
        return out

    def write(self, out_dir: Path, seed: int, scale: float = 0.1) -> Path:
        """Write out_dir/pytorch_lora_weights.safetensors; returns that file."""
        gen = torch.Generator().manual_seed(seed)
        unet_layers = self._random(self.unet_shapes, gen, scale)
        text_layers = self._random(self.text_shapes, gen, scale) if self.text_shapes else None
        out_dir.mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            out_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers, safe_serialization=True,
            unet_lora_adapter_metadata=_config(self.rank, UNET_TARGETS).to_dict(),
            text_encoder_lora_adapter_metadata=_config(self.rank, TEXT_TARGETS).to_dict() if text_layers else None,
        )
        return out_dir / "pytorch_lora_weights.safetensors"


def write_textual_inversion(out_dir: Path, token: str, dim: int, seed: int, num_vectors: int = 1,
                            scale: float = 1.0) -> Path:
    """Write out_dir/learned_embeds.safetensors with one random embedding for `token`."""
    gen = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "learned_embeds.safetensors"
    save_file({token: torch.randn(num_vectors, dim, generator=gen) * scale}, str(path))
    return path


def write_dreambooth(pipeline_dir: Path, out_dir: Path, seed: int, text_encoder: bool = False,
                     noise: float = 0.02) -> dict[str, Path]:
    """Perturbed UNet (and text encoder) folders; returns manifest path -> file."""
    gen = torch.Generator().manual_seed(seed)
    files: dict[str, Path] = {}
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    components: list[tuple[str, torch.nn.Module]] = [("unet", unet)]
    if text_encoder:
        components.append(("text_encoder", CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")))
    for name, module in components:
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * noise)
        module.save_pretrained(out_dir / name, safe_serialization=True)  # type: ignore[operator]
        for path in sorted((out_dir / name).iterdir()):
            files[f"{name}/{path.name}"] = path
    return files
