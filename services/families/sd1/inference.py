"""How an SD 1.x/2.x pipeline is served: one CLIP encoder, classifier-free guidance, a UNet.

Every family's `inference` part has the same functions (services/inference calls them through
`family.part("inference")`): `cfg`, `default_size`, `encode`, `lora_state_dict`, `load_lora`,
plus the constants below. The SD 1.x ones are the reference the other families follow.
"""

from __future__ import annotations

from typing import Any

import torch

SCHEDULERS: tuple[str, ...] | None = None
DEFAULT_GUIDANCE = 7.5  # classifier-free guidance scale when a request sets none
NEGATIVE_PROMPT = True  # the negative prompt is the unconditional half of CFG
"""Scheduler kinds this family can run (None: every DDPM-family scheduler the server has)."""
DENOISER_SAMPLE_ARG = "sample"
"""The denoiser's first (batched) input, positional or by this keyword."""
UNBATCHED_ARGS: frozenset[str] = frozenset()
"""Denoiser keyword arguments without a batch axis (never split per request)."""
SIZE_FROM_IMAGE = True
"""img2img takes its output size from the init image (no width/height arguments)."""


def cfg(guidance_scale: float) -> bool:
    """Whether the pipeline runs classifier-free guidance (a negative batch half)."""
    return guidance_scale > 1.0


def default_size(pipe: Any) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def size_multiple(pipe: Any) -> int:
    """What image sides must be a multiple of (one latent pixel)."""
    return int(pipe.vae_scale_factor)


def encode(pipe: Any, device: torch.device, prompt: str, negative: str, num_images: int, guidance: bool,
           raw_prompt: str = "", raw_negative: str = "") -> dict[str, torch.Tensor]:
    """Prompt embeddings as the pipeline's keyword arguments (the negative half only with CFG).

    `prompt`/`negative` carry the TI slot tokens; the raw texts are for encoders without TI.
    """
    pe, npe = pipe.encode_prompt(prompt, device, num_images, guidance, negative or None)
    return {"prompt_embeds": pe, **({"negative_prompt_embeds": npe} if guidance else {})}


def lora_state_dict(pipe: Any, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """diffusers' format conversion (kohya, PEFT, ...) -> (diffusers-layout dict, kohya alphas)."""
    converted, alphas = type(pipe).lora_state_dict(dict(state_dict))  # the dict is consumed: copy
    return converted, alphas


def load_lora(pipe: Any, converted: dict[str, torch.Tensor], alphas: Any, name: str,
              metadata: dict[str, Any] | None, text_encoders: tuple[str, ...] = ("text_encoder",)) -> None:
    """diffusers' per-component loaders, as `load_lora_weights` calls them (with the header's
    metadata, which diffusers cannot see behind a dict)."""
    pipe.load_lora_into_unet(converted, network_alphas=alphas, unet=pipe.unet, adapter_name=name,
                             _pipeline=pipe, low_cpu_mem_usage=True, metadata=metadata)
    load_text_loras(pipe, converted, alphas, name, metadata, text_encoders)


def load_text_loras(pipe: Any, converted: dict[str, torch.Tensor], alphas: Any, name: str,
                    metadata: dict[str, Any] | None, text_encoders: tuple[str, ...]) -> None:
    for attr in text_encoders:
        encoder = getattr(pipe, attr, None)
        if encoder is not None:
            pipe.load_lora_into_text_encoder(
                converted, network_alphas=alphas, text_encoder=encoder, prefix=attr, lora_scale=pipe.lora_scale,
                adapter_name=name, _pipeline=pipe, low_cpu_mem_usage=True, metadata=metadata)
