"""How SD 1.x/2.x trains: CLIP last hidden state as conditioning, the DDPM noise objective.

Every family's `training` module offers the same names, which services/training's trainers
call through `family.part("training")` instead of branching on pipeline classes:

- `TRAINABLE_TEXT_ENCODERS`: the encoders `train_text_encoder` trains (LoRA or full);
- `PIPELINE_EXTRAS` / `SAMPLE_KWARGS`: what building / calling the family pipeline around live
  components needs (previews, prior-preservation images);
- `LATENT_MULTIPLE`: latent sides must be a multiple of it (Flux packs 2x2 patches);
- `make_schedule(scheduler_config)`: the noise objective (draw, add_noise, target, fixed, snr);
- `validation_scheduler(base_dir)`, `native_resolution(denoiser_config, vae_scale_factor)`;
- `encode_prompts(encoders, tokenizers, prompts, device)` -> conditioning, a dict of tensors
  with the batch first (cacheable per prompt);
- `predict(denoiser, noisy, timesteps, cond, image_size)` -> the prediction, shaped like the
  latents.

The diffusion objective lives here because SD 1.x is its first user; SDXL reuses it. Like the
diffusers recipes it reads the base model's own scheduler config into a `DDPMScheduler`, so
betas, timestep count and prediction type (epsilon or v) match the model being tuned. All
randomness comes from an explicit CPU `torch.Generator`, so the same (seed, step) draws the
same noise on any device and after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

TRAINABLE_TEXT_ENCODERS: tuple[str, ...] = ("text_encoder",)
PIPELINE_EXTRAS: dict[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                   "requires_safety_checker": False}
SAMPLE_KWARGS: dict[str, Any] = {}
LATENT_MULTIPLE = 1


def draw_noise(shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise plus the optional per-(sample, channel) offset, drawn in this order from
    `generator` on the CPU; every objective draws its noise this way, then its timesteps."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
    return noise


class NoiseSchedule:
    """Adds noise at random timesteps and says what the UNet should predict."""

    def __init__(self, scheduler: Any) -> None:  # a DDPMScheduler
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config["num_train_timesteps"])
        self.prediction_type = str(scheduler.config["prediction_type"])
        self._alphas_cumprod = scheduler.alphas_cumprod.float()

    @classmethod
    def from_model_dir(cls, base_model_dir: Path) -> NoiseSchedule:
        return cls(DDPMScheduler.from_pretrained(base_model_dir, subfolder="scheduler"))

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (with the optional per-channel offset) and uniform timesteps, on the CPU."""
        noise = draw_noise(shape, generator, noise_offset)
        timesteps = torch.randint(0, self.num_train_timesteps, (shape[0],), generator=generator)
        return noise, timesteps

    def fixed(self, t: int, count: int, device: torch.device) -> torch.Tensor:
        """`count` copies of training timestep `t` (the fixed-noise eval loss)."""
        return torch.full((count,), t, dtype=torch.long, device=device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)  # type: ignore[no-any-return]

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Epsilon, velocity or the clean sample, as the base model was trained to predict."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)  # type: ignore[no-any-return]
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep."""
        ac = self._alphas_cumprod.to(timesteps.device)[timesteps]
        return ac / (1.0 - ac)


def make_schedule(scheduler_config: Mapping[str, Any]) -> NoiseSchedule:
    return NoiseSchedule(DDPMScheduler.from_config(dict(scheduler_config)))


def validation_scheduler(base_model_dir: Path) -> Any:
    """The recipes' preview sampler: DPM-Solver++ on the base model's schedule."""
    return DPMSolverMultistepScheduler.from_pretrained(base_model_dir, subfolder="scheduler")


def native_resolution(denoiser_config: Mapping[str, Any], vae_scale_factor: int) -> int:
    """The size the base model was trained at (512 for SD 1.5)."""
    return int(denoiser_config["sample_size"]) * vae_scale_factor


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenizer(  # type: ignore[no-any-return]
        prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def encode_prompts(
    encoders: Mapping[str, Any], tokenizers: Mapping[str, Any], prompts: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Last hidden state of the text encoder (what SD's UNet cross-attends to)."""
    ids = tokenize(tokenizers["tokenizer"], prompts).to(device)
    return {"encoder_hidden_states": encoders["text_encoder"](ids)[0]}


def predict(
    unet: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Mapping[str, torch.Tensor],
    image_size: tuple[int, int],
) -> torch.Tensor:
    return unet(noisy, timesteps, cond["encoder_hidden_states"]).sample  # type: ignore[no-any-return]
