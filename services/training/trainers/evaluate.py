"""Denoising loss at fixed noise and timesteps: a deterministic "how well does the model know
these images under these prompts" number.

Training reports it before and after (metrics `eval_loss_initial` / `eval_loss_final`), and the
"it learns the concept" tests and the benchmark call `pipeline_denoising_loss` on a plain
diffusers pipeline with the published artifact loaded, comparing concept and control images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler

from services.training.trainers.cache import LatentCache
from services.training.trainers.data import View, load_rgb, render_view, resize_short_side
from services.training.trainers.models import Components

EVAL_TIMESTEPS = (50, 150, 300, 450, 600, 750, 900)
# The per-run metric uses fewer timesteps: it costs about one training step per image chunk.
TRAINING_EVAL_TIMESTEPS = (150, 450, 750)
EVAL_SEED = 20240611
EVAL_CHUNK = 8


@torch.no_grad()
def denoising_loss(
    unet: Any,
    scheduler: Any,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    *,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
    seed: int = EVAL_SEED,
) -> float:
    """Mean MSE between the UNet's prediction and its target over images x fixed timesteps."""
    generator = torch.Generator().manual_seed(seed)
    device = latents.device
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        ts = torch.full((latents.shape[0],), t, dtype=torch.long, device=device)
        noisy = scheduler.add_noise(latents, noise, ts)
        pred = unet(noisy.to(unet.dtype), ts, embeddings.to(unet.dtype)).sample.float()
        if scheduler.config["prediction_type"] == "v_prediction":
            target = scheduler.get_velocity(latents, noise, ts)
        else:
            target = noise
        total += float(torch.mean((pred - target) ** 2))
    return total / len(timesteps)


def fixed_denoising_loss(
    comps: Components, cache: LatentCache, view_indices: list[int], embeddings: torch.Tensor
) -> float:
    """Training-time variant on cached latents (posterior means), in chunks of EVAL_CHUNK images.

    Leaves the UNet's train/eval mode as it was, and draws no global randomness.
    """
    was_training = comps.unet.training
    comps.unet.eval()
    try:
        total = 0.0
        for start in range(0, len(view_indices), EVAL_CHUNK):
            chunk = view_indices[start : start + EVAL_CHUNK]
            idx = torch.tensor(chunk, device=cache.mean.device)
            latents = (cache.mean[idx] - cache.shift) * cache.scaling_factor
            with comps.autocast():
                loss = denoising_loss(
                    comps.unet,
                    comps.schedule.scheduler,
                    latents,
                    embeddings[start : start + EVAL_CHUNK],
                    timesteps=TRAINING_EVAL_TIMESTEPS,
                    seed=EVAL_SEED + start,
                )
            total += loss * len(chunk)
        return total / len(view_indices)
    finally:
        comps.unet.train(was_training)


@torch.no_grad()
def pipeline_denoising_loss(
    pipe: Any,
    images: list[Path],
    prompts: list[str],
    resolution: int,
    *,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
    seed: int = EVAL_SEED,
) -> float:
    """`denoising_loss` for a loaded pipeline (any adapters applied), centre-cropped images."""
    device = pipe.unet.device
    arrays = []
    for path in images:
        img = resize_short_side(load_rgb(path), resolution)
        w, h = img.size
        view = View(0, (w - resolution) // 2, (h - resolution) // 2, False)
        arrays.append(render_view(img, view, resolution))
    pixels = torch.from_numpy(np.stack(arrays)).to(device, dtype=pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean.float()
    latents = (latents - (pipe.vae.config.get("shift_factor") or 0.0)) * pipe.vae.config["scaling_factor"]
    embeddings, _ = pipe.encode_prompt(prompts, device, 1, False)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return denoising_loss(pipe.unet, scheduler, latents, embeddings, timesteps=timesteps, seed=seed)
