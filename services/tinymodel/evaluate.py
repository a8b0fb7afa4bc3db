"""The tiny model's acceptance metrics, shared by pretraining (PRETRAIN.md) and the tests.

* held-out denoising loss: epsilon-prediction MSE of the UNet on the fixed held-out split, with
  noise and timesteps drawn from a fixed seed, each pipeline in its own VAE latent space -- the
  number a fine-tuning run moves, and the one that tells a trained model from a random one;
* colour control: for N seeds, "a red <shape>" must come out redder (mean R channel) than
  "a blue <shape>" from the same starting noise -- the text actually steers the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from services.tinymodel.data import SHAPES, held_out

EVAL_SEED = 1234
# A diffusers StableDiffusionPipeline; Any because diffusers' lazy-import module hides its
# attributes from mypy.
Pipeline = Any


@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str]) -> torch.Tensor:
    """Last hidden state of the text encoder for 77-token padded prompts (what the UNet sees)."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@torch.no_grad()
def denoising_loss(pipe: Pipeline, images: np.ndarray, captions: list[str],
                   seed: int = EVAL_SEED, batch_size: int = 32) -> float:
    """Mean epsilon MSE over images at fixed-seed timesteps and noise (lower is better).

    A v-prediction model's output is converted to its implied epsilon, so the number means the
    same for either parametrisation.
    """
    gen = torch.Generator().manual_seed(seed)
    scheduler = pipe.scheduler
    alphas = scheduler.alphas_cumprod
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size])
        latents = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, len(alphas), (len(x),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1).to(latents.dtype)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        cond = encode_prompts(pipe, captions[start:start + batch_size])
        pred = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
        if scheduler.config.prediction_type == "v_prediction":  # compare every model in epsilon terms
            pred = a.sqrt() * pred + (1 - a).sqrt() * noisy
        total += float(torch.nn.functional.mse_loss(pred, noise, reduction="sum"))
        count += noise.numel()
    return total / count


def held_out_loss(pipe: Pipeline, count: int = 64, resolution: int = 32) -> float:
    """denoising_loss on the first `count` held-out scenes."""
    images, captions = held_out(count, resolution)
    return denoising_loss(pipe, images, captions)


@dataclass(frozen=True)
class ColourResult:
    """Per-seed colour statistics of "a red X" vs "a blue X" images drawn from identical noise.

    `wins` compares the whole-image mean red channel. The model picks a background colour per
    seed (yellow, white and beige backgrounds are red-heavy), and that choice can differ
    between the two prompts even from the same noise, so this raw count mostly measures the
    background. `redness_wins` compares mean(R) - mean(B), which cancels grey-ish backgrounds
    and measures what the prompt controls: whether the object is red rather than blue. The
    acceptance test uses `redness_wins`; PRETRAIN.md records both.
    """

    red_prompt_red: list[float]
    blue_prompt_red: list[float]
    red_prompt_redness: list[float]
    blue_prompt_redness: list[float]

    @property
    def wins(self) -> int:
        """Seeds where the red prompt's image has the higher mean red channel."""
        return sum(r > b for r, b in zip(self.red_prompt_red, self.blue_prompt_red, strict=True))

    @property
    def redness_wins(self) -> int:
        """Seeds where the red prompt's image has the higher mean(R) - mean(B)."""
        return sum(r > b for r, b in zip(self.red_prompt_redness, self.blue_prompt_redness, strict=True))


def mean_red(images: list) -> list[float]:
    """Mean red channel (0-255) of each PIL image."""
    return [float(np.asarray(im.convert("RGB"), dtype=np.float32)[..., 0].mean()) for im in images]


def mean_redness(images: list) -> list[float]:
    """Mean red minus mean blue channel (-255..255) of each PIL image."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]
    return [float(a[..., 0].mean() - a[..., 2].mean()) for a in arrays]


@torch.no_grad()
def colour_control(pipe: Pipeline, seeds: int = 10, steps: int = 20,
                   resolution: int = 32, guidance_scale: float = 7.5) -> ColourResult:
    """Generate "a red <shape>" and "a blue <shape>" for each seed from identical noise."""
    shapes = [SHAPES[i % len(SHAPES)] for i in range(seeds)]
    images = []
    for colour in ("red", "blue"):
        gens = [torch.Generator().manual_seed(s) for s in range(seeds)]
        out = pipe([f"a {colour} {shape}" for shape in shapes], num_inference_steps=steps,
                   height=resolution, width=resolution, guidance_scale=guidance_scale, generator=gens)
        images.append(out.images)
    return ColourResult(red_prompt_red=mean_red(images[0]), blue_prompt_red=mean_red(images[1]),
                        red_prompt_redness=mean_redness(images[0]), blue_prompt_redness=mean_redness(images[1]))
