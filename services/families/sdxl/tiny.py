"""A tiny random SDXL pipeline: the real architecture (text_time added conditioning, two CLIP
encoders, linear-projection transformer blocks) scaled to ~1M UNet parameters at 32 px."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from services.families.tiny_parts import clip_tokenizer, save_with_clip_tokenizers, tiny_clip, tiny_vae

TEXT_HIDDEN = 32  # each encoder; the UNet cross-attends to both concatenated (64)
TIME_EMBED = 8


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
    )


def tiny_scheduler() -> EulerDiscreteScheduler:
    """SDXL's shipped scheduler config: Euler, scaled-linear betas, leading spacing, epsilon."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", interpolation_type="linear",
    )


def build_tiny(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025), unet=tiny_unet(), scheduler=tiny_scheduler(),
        text_encoder=tiny_clip(tokenizer_dir, TEXT_HIDDEN),
        text_encoder_2=tiny_clip(tokenizer_dir, TEXT_HIDDEN, projection=True),
        tokenizer=clip_tokenizer(tokenizer_dir), tokenizer_2=clip_tokenizer(tokenizer_dir),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    return save_with_clip_tokenizers(pipe, out_dir, tokenizer_dir, ("tokenizer", "tokenizer_2"))
