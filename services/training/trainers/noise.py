"""The DDPM forward process and prediction targets, from the base model's own schedule.

Like the reference recipes we read `scheduler/scheduler_config.json` of the base model into a
`DDPMScheduler`, so betas, timestep count and prediction type (epsilon or v) always match the
model being tuned. All randomness comes from an explicit CPU `torch.Generator`, so the same
(seed, step) draws the same noise on any device and after a resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler


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
        noise = torch.randn(shape, generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.num_train_timesteps, (shape[0],), generator=generator)
        return noise, timesteps

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Epsilon, velocity or the clean sample, as the base model was trained to predict."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if self.prediction_type == "sample":
            return latents
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r}")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep."""
        ac = self._alphas_cumprod.to(timesteps.device)[timesteps]
        return ac / (1.0 - ac)
