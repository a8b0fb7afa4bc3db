"""The noise objective the trainers code against: a family's schedule (see `Schedule`).

The schedules themselves are family behaviour (services/families/<name>/training.py):
`NoiseSchedule` (DDPM epsilon / v / sample, from the base model's scheduler config; SD 1.x and
SDXL) and Flux's flow matching. Every one draws from an explicit CPU `torch.Generator`, so the
same (seed, step) draws the same noise on any device and after a resume.
"""

from __future__ import annotations

from typing import Protocol

import torch

from services.families.sd1.training import NoiseSchedule

__all__ = ["NoiseSchedule", "Schedule"]


class Schedule(Protocol):
    """What the batch sampler, the loss and the eval loss ask of a family's objective."""

    num_train_timesteps: int
    prediction_type: str

    def draw(
        self, shape: tuple[int, ...], generator: torch.Generator, noise_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def fixed(self, t: int, count: int, device: torch.device) -> torch.Tensor: ...

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor: ...
