"""Encode-once caches for the frozen VAE and (when frozen) the text encoder.

The reference loops run the VAE encoder and the text encoder on every step even though
neither changes. We encode every image view once and keep the VAE posterior's mean and std,
then draw `mean + std * eps` per step with the step's generator: the same distribution the
recipe's `latent_dist.sample()` draws from, at the cost of one multiply-add. Prompt
conditionings are cached per distinct prompt when the text encoders are frozen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from services.training.trainers.models import Components

ENCODE_CHUNK = 8
Conditioning = dict[str, torch.Tensor]  # a family's prompt conditioning, batch first


class LatentCache:
    """Posterior mean/std of every view, on the training device."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, shift: float) -> None:
        self.mean = mean
        self.std = std
        self.scaling_factor = scaling_factor
        self.shift = shift

    @classmethod
    @torch.no_grad()
    def encode(cls, comps: Components, pixels: np.ndarray) -> LatentCache:
        means, stds = [], []
        for start in range(0, len(pixels), ENCODE_CHUNK):
            chunk = torch.from_numpy(pixels[start : start + ENCODE_CHUNK])
            dist = comps.vae.encode(chunk.to(comps.device, dtype=comps.weight_dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        shift = comps.vae.config.get("shift_factor") or 0.0
        return cls(torch.cat(means), torch.cat(stds), float(comps.vae.config["scaling_factor"]), float(shift))

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape[1:])

    def sample(self, view_indices: list[int], eps: torch.Tensor) -> torch.Tensor:
        """Scaled latents of the given views; `eps` is standard normal noise of the batch's shape."""
        idx = torch.tensor(view_indices, device=self.mean.device)
        z = self.mean[idx] + self.std[idx] * eps.to(self.mean.device)
        return (z - self.shift) * self.scaling_factor


class TextCache:
    """Prompt -> its conditioning (one row of every tensor), computed once per distinct prompt."""

    def __init__(self, encode: Callable[[list[str]], Conditioning]) -> None:
        self._encode = encode
        self._cache: dict[str, Conditioning] = {}

    @torch.no_grad()
    def warm(self, prompts: list[str]) -> None:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            encoded = self._encode(missing)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = {k: v[i] for k, v in encoded.items()}

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._cache

    def __call__(self, prompts: list[str]) -> Conditioning:
        self.warm(prompts)
        rows = [self._cache[p] for p in prompts]
        return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}
