"""The tiny Stable Diffusion pipeline: component configs and the random-initialised build.

Shapes follow SD 1.x exactly (VAE with 4 latent channels, UNet2DConditionModel with cross-
attention to a CLIP text encoder's last hidden state, PNDM/DDPM "scaled_linear" schedule,
epsilon prediction), only scaled down: ~2M UNet parameters, 32 px images, 16x16 latents, so every
diffusers code path (LoRA targets, textual inversion, DreamBooth) runs unchanged on a CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from services.families.tiny_parts import save_with_clip_tokenizers
from services.tinymodel.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tokenizer

RESOLUTION = 32
TEXT_HIDDEN = 64
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

_LEVEL_CHANNELS = (32, 64)  # the VAE's and the UNet's levels: two, 32 then 64 channels wide


def _levels(down_block: str, up_block: str) -> dict[str, Any]:
    """The level structure the VAE and the UNet share: one block of each type per level, one
    layer per block, 32 norm groups."""
    return {
        "down_block_types": (down_block,) * len(_LEVEL_CHANNELS),
        "up_block_types": (up_block,) * len(_LEVEL_CHANNELS),
        "block_out_channels": _LEVEL_CHANNELS,
        "layers_per_block": 1,
        "norm_num_groups": 32,
    }


def make_vae(resolution: int = RESOLUTION, scaling_factor: float = 1.0) -> AutoencoderKL:
    """A two-level KL autoencoder: 32 px RGB <-> 16x16x4 latents (downsampling factor 2)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        **_levels("DownEncoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=resolution,
        scaling_factor=scaling_factor,
    )


def make_unet(resolution: int = RESOLUTION) -> UNet2DConditionModel:
    """A two-level conditional UNet with cross-attention at every level (LoRA targets exist)."""
    return UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        **_levels("CrossAttnDownBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=TEXT_HIDDEN,
    )


def make_text_encoder(vocab: dict[str, int]) -> CLIPTextModel:
    """A small CLIP text transformer sized to the learned vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config)


def make_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """The inference scheduler SD 1.x ships (PNDM, PLMS steps)."""
    return PNDMScheduler(**{**SCHEDULE, "prediction_type": prediction_type}, skip_prk_steps=True,
                         set_alpha_to_one=False)


def make_noise_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """The training noise schedule: DDPM with the same betas as the inference scheduler."""
    return DDPMScheduler(**{**SCHEDULE, "prediction_type": prediction_type}, clip_sample=False)


def assemble(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
             tokenizer: CLIPTokenizer, prediction_type: str = "epsilon") -> Any:
    """Components -> a StableDiffusionPipeline without safety checker or feature extractor."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe: Any, out_dir: Path, tokenizer_dir: Path) -> None:
    """Save as safetensors, then put the canonical vocab.json/merges.txt tokenizer files in place.

    transformers 5 saves a tokenizer as tokenizer.json; SD pipelines ship (and older loaders
    expect) vocab.json + merges.txt, so the folder written by write_tokenizer replaces it.
    """
    save_with_clip_tokenizers(pipe, out_dir, tokenizer_dir, ("tokenizer",))


def build_random_pipeline(out_dir: Path, seed: int = 0) -> Path:
    """Write a seeded, random-initialised tiny SD pipeline folder to out_dir and return it."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        vocab = write_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(seed)
        pipe = assemble(make_vae(), make_unet(), make_text_encoder(vocab), tokenizer)
        save_pipeline(pipe, out_dir, tok_dir)
    return out_dir
