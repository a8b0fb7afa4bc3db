"""How SDXL trains: two CLIP encoders' penultimate states, encoder 2's pooled projection and
six "time ids", on the DDPM objective SD 1.x uses (see services/families/sd1/training.py for
the names every family's training module offers).

Time ids are (original size, crop top-left, target size). We condition every sample on
(resolution, resolution, 0, 0, resolution, resolution), which is what the SDXL pipeline passes
at generation by default; the recipe's per-image original size and crop offset are not
tracked through the latent cache (a documented simplification, exact for square images
trained at their own size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from services.families.sd1.training import (
    LATENT_MULTIPLE,
    SAMPLE_KWARGS,
    NoiseSchedule,
    make_schedule,
    native_resolution,
    tokenize,
    validation_scheduler,
)

__all__ = [
    "LATENT_MULTIPLE", "PIPELINE_EXTRAS", "SAMPLE_KWARGS", "TRAINABLE_TEXT_ENCODERS", "NoiseSchedule",
    "encode_prompts", "make_schedule", "native_resolution", "predict", "time_ids", "validation_scheduler",
]

TRAINABLE_TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
PIPELINE_EXTRAS: dict[str, Any] = {"add_watermarker": False}
_PAIRS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def encode_prompts(
    encoders: Mapping[str, Any], tokenizers: Mapping[str, Any], prompts: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """As `StableDiffusionXLPipeline.encode_prompt` (no clip skip): hidden_states[-2] of both
    encoders concatenated, and the second encoder's projected pooled output."""
    states: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for encoder, tokenizer in _PAIRS:
        ids = tokenize(tokenizers[tokenizer], prompts).to(device)
        out = encoders[encoder](ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
            pooled = out[0]
        states.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("SDXL's second text encoder gave no pooled projection")
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}


def time_ids(image_size: tuple[int, int], count: int, like: torch.Tensor) -> torch.Tensor:
    h, w = image_size
    row = torch.tensor([[h, w, 0, 0, h, w]], dtype=like.dtype, device=like.device)
    return row.repeat(count, 1)


def predict(
    unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor],
    image_size: tuple[int, int],
) -> torch.Tensor:
    pooled = cond["text_embeds"]
    added = {"text_embeds": pooled, "time_ids": time_ids(image_size, noisy.shape[0], pooled)}
    return unet(  # type: ignore[no-any-return]
        noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added
    ).sample
