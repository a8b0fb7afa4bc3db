"""How Flux trains: rectified flow over packed 2x2 latent patches, conditioned on T5 token states,
CLIP-L's pooled output and the guidance embedding (see services/families/sd1/training.py for
the names every family's training module offers).

Objective (as diffusers' train_dreambooth_lora_flux.py with weighting_scheme "none"):
x_t = (1 - sigma) * x0 + sigma * noise, the transformer predicts noise - x0, plain MSE. Sigmas
are drawn uniformly from the base scheduler's 1000 training sigmas (its static shift applied,
none with dynamic shifting, as the recipe's scheduler copy has them) with the step's seeded
CPU generator, so a resumed run draws the same ones. The transformer takes the sigma itself
as its timestep (FluxPipeline passes `t / 1000` with t = 1000 * sigma). Latents are
`(vae_latents - shift_factor) * scaling_factor` (the latent cache applies both).

Text: T5 states at `MAX_SEQUENCE_LENGTH` tokens (FluxPipeline's default), CLIP-L pooled; the
text encoder that `train_text_encoder` trains is CLIP-L only (T5 stays frozen, as in the
recipe). Textual Inversion trains CLIP-L's embedding (the family's one `ti_key`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from services.families.sd1.training import draw_noise, tokenize

TRAINABLE_TEXT_ENCODERS: tuple[str, ...] = ("text_encoder",)
PIPELINE_EXTRAS: dict[str, Any] = {}
MAX_SEQUENCE_LENGTH = 512
SAMPLE_KWARGS: dict[str, Any] = {"max_sequence_length": MAX_SEQUENCE_LENGTH}
LATENT_MULTIPLE = 2  # 2x2 latent patches become one token
GUIDANCE_SCALE = 3.5  # FluxPipeline's default, and the recipe's --guidance_scale
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size (latent pixels): 1024 px at VAE factor 8


class FlowMatchingSchedule:
    """Draws sigmas and builds x_t and the velocity target of rectified flow."""

    prediction_type = "flow_matching"

    def __init__(self, sigmas: torch.Tensor, num_train_timesteps: int) -> None:
        self.sigmas = sigmas.float().cpu()
        self.num_train_timesteps = num_train_timesteps

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the optional per-channel offset), then uniform sigmas, on the CPU."""
        noise = draw_noise(shape, generator, noise_offset)
        u = torch.rand((shape[0],), generator=generator)
        index = (u * len(self.sigmas)).long().clamp_(0, len(self.sigmas) - 1)
        return noise, self.sigmas[index]

    def fixed(self, t: int, count: int, device: torch.device) -> torch.Tensor:
        """`count` copies of the sigma of training timestep `t` (t / num_train_timesteps)."""
        return torch.full((count,), t / self.num_train_timesteps, dtype=torch.float32, device=device)

    @staticmethod
    def _expand(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return sigmas.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        s = self._expand(sigmas, latents)
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def snr(self, sigmas: torch.Tensor) -> torch.Tensor:
        raise ValueError("min-SNR weighting is defined for DDPM objectives, not flow matching")


def make_schedule(scheduler_config: Mapping[str, Any]) -> FlowMatchingSchedule:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    return FlowMatchingSchedule(scheduler.sigmas, int(scheduler.config["num_train_timesteps"]))


def validation_scheduler(base_model_dir: Path) -> Any:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(base_model_dir, subfolder="scheduler")


def native_resolution(denoiser_config: Mapping[str, Any], vae_scale_factor: int) -> int:
    """FluxPipeline's default size (the transformer's config has no sample size)."""
    return DEFAULT_SAMPLE_SIZE * vae_scale_factor


def encode_prompts(
    encoders: Mapping[str, Any], tokenizers: Mapping[str, Any], prompts: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """As `FluxPipeline.encode_prompt`: CLIP-L's pooled output and T5's last hidden state."""
    clip_ids = tokenize(tokenizers["tokenizer"], prompts).to(device)
    pooled = encoders["text_encoder"](clip_ids, output_hidden_states=False).pooler_output
    t5_ids = tokenizers["tokenizer_2"](
        prompts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    states = encoders["text_encoder_2"](t5_ids, output_hidden_states=False)[0]
    return {"encoder_hidden_states": states, "pooled_projections": pooled}


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)  # type: ignore[no-any-return]


def unpack(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack` for latents of `channels` x `height` x `width`."""
    b = tokens.shape[0]
    out = tokens.view(b, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, channels, height, width)


def predict(
    transformer: Any, noisy: torch.Tensor, sigmas: torch.Tensor, cond: Mapping[str, torch.Tensor],
    image_size: tuple[int, int],
) -> torch.Tensor:
    """The transformer's velocity for unpacked latents, unpacked again (so loss and targets
    stay in the latent layout every family shares)."""
    b, c, h, w = noisy.shape
    states = cond["encoder_hidden_states"]
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(states.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((b,), GUIDANCE_SCALE, device=noisy.device, dtype=torch.float32)
    out = transformer(
        hidden_states=pack(noisy), timestep=sigmas.to(noisy.device, noisy.dtype), guidance=guidance,
        pooled_projections=cond["pooled_projections"], encoder_hidden_states=states,
        txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
    )[0]
    return unpack(out, c, h, w)
