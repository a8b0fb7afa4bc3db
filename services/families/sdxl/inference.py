"""How an SDXL pipeline is served: two CLIP encoders (penultimate states concatenated, the second
one's pooled projection), six time ids the pipeline derives from the size, a UNet.

Same functions as services/families/sd1/inference.py (see there); the LoRA loaders are SD 1.x's
with both text encoders, as diffusers' StableDiffusionXLLoraLoaderMixin calls them.
"""

from __future__ import annotations

from typing import Any

import torch

from services.families.sd1 import inference as sd1

SCHEDULERS: tuple[str, ...] | None = None
DEFAULT_GUIDANCE = 7.5  # StableDiffusionXLPipeline's default
NEGATIVE_PROMPT = True
DENOISER_SAMPLE_ARG = "sample"
UNBATCHED_ARGS: frozenset[str] = frozenset()
SIZE_FROM_IMAGE = True
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

cfg = sd1.cfg
default_size = sd1.default_size
size_multiple = sd1.size_multiple
lora_state_dict = sd1.lora_state_dict


def encode(pipe: Any, device: torch.device, prompt: str, negative: str, num_images: int, guidance: bool,
           raw_prompt: str = "", raw_negative: str = "") -> dict[str, torch.Tensor]:
    """Both encoders see the TI-rewritten prompt (each has its own slot rows for the tokens)."""
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=num_images,
        do_classifier_free_guidance=guidance, negative_prompt=negative or None,
    )
    out = {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}
    if guidance:
        out |= {"negative_prompt_embeds": npe, "negative_pooled_prompt_embeds": nppe}
    return out


def load_lora(pipe: Any, converted: dict[str, torch.Tensor], alphas: Any, name: str,
              metadata: dict[str, Any] | None) -> None:
    sd1.load_lora(pipe, converted, alphas, name, metadata, TEXT_ENCODERS)
