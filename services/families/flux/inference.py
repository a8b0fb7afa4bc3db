"""How a Flux pipeline is served: T5 token states + CLIP-L's pooled output, a guidance
*embedding* instead of classifier-free guidance, a transformer over packed latent tokens.

Same functions as services/families/sd1/inference.py (see there). Differences that matter:
* `guidance_scale` is the distilled guidance the transformer embeds (Flux-dev), so there is no
  negative batch half (`cfg` is False) and the negative prompt is not used (diffusers' "true
  CFG" is not offered).
* Textual Inversion lives in CLIP-L only: T5 is given the request's own text (`raw_prompt`),
  exactly what diffusers' `load_textual_inversion` + FluxPipeline do (T5's tokenizer never
  knows the trigger token), while CLIP sees the slot tokens.
* Only the flow-matching scheduler the model ships with applies.
"""

from __future__ import annotations

from typing import Any

import torch

SCHEDULERS: tuple[str, ...] | None = ("default",)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline's default embedded guidance (Flux-dev)
NEGATIVE_PROMPT = False  # no unconditional half: a negative prompt would silently do nothing
DENOISER_SAMPLE_ARG = "hidden_states"
UNBATCHED_ARGS: frozenset[str] = frozenset({"txt_ids", "img_ids"})  # [seq, 3]: no batch axis
SIZE_FROM_IMAGE = False  # FluxImg2ImgPipeline defaults to its own size: pass width/height
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default: the T5 padding length changes the image


def cfg(guidance_scale: float) -> bool:
    return False


def default_size(pipe: Any) -> int:
    """The VAE's image size (Flux's transformer config has no sample size)."""
    return int(pipe.vae.config.sample_size)


def size_multiple(pipe: Any) -> int:
    """Latents are packed in 2x2 patches: a side is a whole number of patches."""
    return int(pipe.vae_scale_factor) * 2


def encode(pipe: Any, device: torch.device, prompt: str, negative: str, num_images: int, guidance: bool,
           raw_prompt: str = "", raw_negative: str = "") -> dict[str, torch.Tensor]:
    pe, ppe, _text_ids = pipe.encode_prompt(
        prompt=prompt, prompt_2=raw_prompt or prompt, device=device, num_images_per_prompt=num_images,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return {"prompt_embeds": pe, "pooled_prompt_embeds": ppe}


def lora_state_dict(pipe: Any, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """diffusers' Flux conversion (kohya / ai-toolkit / diffusers layouts) and kohya alphas."""
    converted, alphas = type(pipe).lora_state_dict(dict(state_dict), return_alphas=True)
    return converted, alphas


def load_lora(pipe: Any, converted: dict[str, torch.Tensor], alphas: Any, name: str,
              metadata: dict[str, Any] | None) -> None:
    """FluxPipeline.load_lora_weights' two loaders: the transformer, then CLIP-L (T5 takes none)."""
    transformer = {k: v for k, v in converted.items() if k.startswith("transformer.") and "lora" in k}
    if any(k.startswith("transformer.") and "lora" not in k for k in converted):
        raise ValueError("Flux LoRAs with norm layers (control LoRAs) are not supported")
    if transformer:
        pipe.load_lora_into_transformer(transformer, network_alphas=alphas, transformer=pipe.transformer,
                                        adapter_name=name, metadata=metadata, _pipeline=pipe,
                                        low_cpu_mem_usage=True)
    pipe.load_lora_into_text_encoder(
        converted, network_alphas=alphas, text_encoder=pipe.text_encoder, prefix="text_encoder",
        lora_scale=pipe.lora_scale, adapter_name=name, _pipeline=pipe, low_cpu_mem_usage=True, metadata=metadata)
