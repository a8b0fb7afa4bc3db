"""Loading the base model's components for training, with device and precision handling.

Trainers support Stable Diffusion 1.x/2.x pipelines (one CLIP text encoder). Frozen
components are cast to the half-precision weight dtype on accelerators (as the recipes do);
trainable parameters always stay float32 and mixed precision runs under autocast. On the CPU
everything is float32: half-precision matmuls there are slower than float32, not faster.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from services.common.errors import FailedPrecondition
from services.common.model_loading import MODEL_LOAD_LOCK
from services.training.trainers.noise import NoiseSchedule

SUPPORTED_PIPELINES = frozenset({"StableDiffusionPipeline"})
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """ "auto" -> bf16 where the GPU supports it, else fp16 on CUDA; float32 ("no") on CPU."""
    if device.type != "cuda":
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


@dataclass
class Components:
    """The pipeline pieces a trainer works with, already on the training device."""

    # diffusers/transformers models are typed Any: their lazy-module classes confuse mypy.
    tokenizer: Any  # CLIPTokenizer
    text_encoder: Any  # CLIPTextModel
    vae: Any  # AutoencoderKL
    unet: Any  # UNet2DConditionModel
    schedule: NoiseSchedule
    device: torch.device
    precision: str  # "no" | "fp16" | "bf16"
    base_model_dir: Path

    @property
    def weight_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config["block_out_channels"]) - 1))

    @property
    def native_resolution(self) -> int:
        """The resolution the base model was trained at (512 for SD 1.5)."""
        return int(self.unet.config["sample_size"]) * self.vae_scale_factor

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden state of the text encoder (what SD's UNet cross-attends to)."""
        return self.text_encoder(input_ids.to(self.device))[0]

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids


def check_pipeline(base_model_dir: Path) -> None:
    """Refuse pipelines these trainers cannot tune (e.g. SDXL's two text encoders)."""
    index = json.loads((base_model_dir / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if name not in SUPPORTED_PIPELINES:
        raise FailedPrecondition(f"base model pipeline {name!r} is not supported for training", "spec.base_model")


def load_components(base_model_dir: Path, device: str, precision: str) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and the noise schedule; everything frozen."""
    check_pipeline(base_model_dir)
    dev = torch.device(device)
    resolved = resolve_precision(precision, dev)
    dtype = _DTYPES[resolved]

    def frozen(module: Any) -> Any:
        # Move each model as soon as it is loaded: host memory then peaks at the largest
        # component, not at the sum of all three.
        return module.requires_grad_(False).eval().to(dev)

    with MODEL_LOAD_LOCK:  # loads patch torch globals: services/common/model_loading.py
        return Components(
            tokenizer=CLIPTokenizer.from_pretrained(base_model_dir / "tokenizer"),
            text_encoder=frozen(CLIPTextModel.from_pretrained(base_model_dir / "text_encoder", dtype=dtype)),
            vae=frozen(AutoencoderKL.from_pretrained(base_model_dir / "vae", torch_dtype=dtype)),
            unet=frozen(UNet2DConditionModel.from_pretrained(base_model_dir / "unet", torch_dtype=dtype)),
            schedule=NoiseSchedule.from_model_dir(base_model_dir),
            device=dev,
            precision=resolved,
            base_model_dir=base_model_dir,
        )
