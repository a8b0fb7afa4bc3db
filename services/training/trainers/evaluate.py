"""Denoising loss at fixed noise and timesteps: a deterministic "how well does the model know
these images under these prompts" number.

Training reports it before and after (metrics `eval_loss_initial` / `eval_loss_final`), and the
"it learns the concept" tests and the benchmark call `pipeline_denoising_loss` on a plain
diffusers pipeline with the published artifact loaded, comparing concept and control images.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.families import of_pipeline
from services.training.trainers.cache import Conditioning, LatentCache
from services.training.trainers.data import View, load_rgb, render_view, resize_short_side
from services.training.trainers.models import Components
from services.training.trainers.noise import Schedule

EVAL_TIMESTEPS = (50, 150, 300, 450, 600, 750, 900)
# The per-run metric uses fewer timesteps: it costs about one training step per image chunk.
TRAINING_EVAL_TIMESTEPS = (150, 450, 750)
EVAL_SEED = 20240611
EVAL_CHUNK = 8


Predict = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]


@torch.no_grad()
def denoising_loss(
    predict: Predict,
    schedule: Schedule,
    latents: torch.Tensor,
    cond: Conditioning,
    *,
    dtype: torch.dtype = torch.float32,
    timesteps: tuple[int, ...] = EVAL_TIMESTEPS,
    seed: int = EVAL_SEED,
) -> float:
    """Mean MSE between the denoiser's prediction and its target over images x fixed timesteps
    (flow matching: the sigmas t / 1000 of those timesteps)."""
    generator = torch.Generator().manual_seed(seed)
    device = latents.device
    cast = {k: v.to(dtype) for k, v in cond.items()}
    total = 0.0
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator).to(device)
        ts = schedule.fixed(t, latents.shape[0], device)
        noisy = schedule.add_noise(latents, noise, ts)
        pred = predict(noisy.to(dtype), ts, cast).float()
        total += float(torch.mean((pred - schedule.target(latents, noise, ts)) ** 2))
    return total / len(timesteps)


def fixed_denoising_loss(
    comps: Components, cache: LatentCache, view_indices: list[int], embeddings: Conditioning
) -> float:
    """Training-time variant on cached latents (posterior means), in chunks of EVAL_CHUNK images.

    Leaves the denoiser's train/eval mode as it was, and draws no global randomness.
    """
    was_training = comps.denoiser.training
    comps.denoiser.eval()
    try:
        total = 0.0
        for start in range(0, len(view_indices), EVAL_CHUNK):
            chunk = view_indices[start : start + EVAL_CHUNK]
            idx = torch.tensor(chunk, device=cache.mean.device)
            latents = (cache.mean[idx] - cache.shift) * cache.scaling_factor
            with comps.autocast():
                loss = denoising_loss(
                    comps.predict,
                    comps.schedule,
                    latents,
                    {k: v[start : start + EVAL_CHUNK] for k, v in embeddings.items()},
                    dtype=comps.denoiser.dtype,
                    timesteps=TRAINING_EVAL_TIMESTEPS,
                    seed=EVAL_SEED + start,
                )
            total += loss * len(chunk)
        return total / len(view_indices)
    finally:
        comps.denoiser.train(was_training)


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
    """`denoising_loss` for a loaded diffusers pipeline of any family (adapters applied),
    centre-cropped images; conditioning and objective come from the pipeline's family."""
    family = of_pipeline(pipe)
    recipe = family.part("training")
    denoiser = getattr(pipe, family.denoiser)
    device = denoiser.device
    arrays = []
    for path in images:
        img = resize_short_side(load_rgb(path), resolution)
        w, h = img.size
        view = View(0, (w - resolution) // 2, (h - resolution) // 2, False)
        arrays.append(render_view(img, view, resolution))
    pixels = torch.from_numpy(np.stack(arrays)).to(device, dtype=pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean.float()
    latents = (latents - (pipe.vae.config.get("shift_factor") or 0.0)) * pipe.vae.config["scaling_factor"]
    encoders = {slot.encoder: getattr(pipe, slot.encoder) for slot in family.text_encoders}
    tokenizers = {slot.tokenizer: getattr(pipe, slot.tokenizer) for slot in family.text_encoders}
    if hasattr(pipe, "maybe_convert_prompt"):  # multi-vector TI tokens, as encode_prompt expands them
        prompts = pipe.maybe_convert_prompt(prompts, pipe.tokenizer)
    cond = recipe.encode_prompts(encoders, tokenizers, prompts, device)
    size = (resolution, resolution)

    def predict(noisy: torch.Tensor, ts: torch.Tensor, c: Conditioning) -> torch.Tensor:
        return recipe.predict(denoiser, noisy, ts, c, size)  # type: ignore[no-any-return]

    schedule = recipe.make_schedule(pipe.scheduler.config)
    return denoising_loss(predict, schedule, latents, cond, dtype=denoiser.dtype, timesteps=timesteps, seed=seed)
