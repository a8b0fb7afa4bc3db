"""The plain diffusers/peft LoRA loops that SDXL and Flux training is measured against.

Written the way diffusers' `train_dreambooth_lora_sdxl.py` and `train_dreambooth_lora_flux.py`
recipes train, without accelerate: each step VAE-encodes the batch and encodes the prompt with
the pipeline's own `encode_prompt`, then trains LoRA (rank r on the attention projections) on
the denoiser with AdamW. SDXL: epsilon objective with add_time_ids; Flux: flow matching with
uniform timestep sampling, packed latents, guidance embedding. Used by bench/train_throughput.py
(`--model tiny-sdxl|tiny-flux|sdxl|flux`) in its own child process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model

SDXL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
# Like for like with run_training's Flux defaults: the family's eight attention projections
# (image and context streams), T5 at FluxPipeline's 512 tokens, guidance 3.5.
FLUX_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
FLUX_GUIDANCE = 3.5
FLUX_MAX_SEQUENCE = 512

StepFn = Callable[[torch.Tensor], float]
"""One training step on a batch of pixels in [-1, 1]; returns the loss."""


def _lora_params(model: torch.nn.Module, rank: int, targets: list[str]) -> list[torch.nn.Parameter]:
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                       target_modules=targets), model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def _optimise(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> float:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


def load_pipeline(base: Path, device: torch.device, dtype: torch.dtype) -> Any:
    pipe = DiffusionPipeline.from_pretrained(base, torch_dtype=dtype).to(device)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False)
    return pipe


def sdxl_step_fn(pipe: Any, prompt: str, rank: int, autocast: Any) -> StepFn:
    unet, vae = pipe.unet, pipe.vae
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)  # the recipe's forward process, same betas
    params = _lora_params(unet, rank, SDXL_TARGETS)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet.train()

    def step(pixels: torch.Tensor) -> float:
        batch, side = pixels.shape[0], pixels.shape[-1]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=pixels.device, num_images_per_prompt=batch,
                                                      do_classifier_free_guidance=False)
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], device=pixels.device).repeat(batch, 1)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, ddpm.config.num_train_timesteps, (batch,), device=pixels.device)
        noisy = ddpm.add_noise(latents, noise, timesteps)
        with autocast:
            pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                        return_dict=False)[0]
        return _optimise(F.mse_loss(pred.float(), noise.float()), params, optimizer)

    return step


def flux_step_fn(pipe: Any, prompt: str, rank: int, autocast: Any) -> StepFn:
    transformer, vae = pipe.transformer, pipe.vae
    params = _lora_params(transformer, rank, FLUX_TARGETS)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    transformer.train()
    factor = pipe.vae_scale_factor

    def step(pixels: torch.Tensor) -> float:
        batch, dev = pixels.shape[0], pixels.device
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            embeds, pooled, text_ids = pipe.encode_prompt(
                prompt, prompt_2=None, device=dev, num_images_per_prompt=batch, max_sequence_length=FLUX_MAX_SEQUENCE)
        _, channels, height, width = latents.shape
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, dev, latents.dtype)
        noise = torch.randn_like(latents)
        sigmas = torch.rand(batch, device=dev).view(batch, 1, 1, 1)  # uniform: the recipe's "none" weighting
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        packed = pipe._pack_latents(noisy, batch, channels, height, width)
        guidance = torch.full((batch,), FLUX_GUIDANCE, device=dev) if transformer.config.guidance_embeds else None
        with autocast:
            pred = transformer(hidden_states=packed, timestep=sigmas.flatten(), guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=image_ids, return_dict=False)[0]
        pred = pipe._unpack_latents(pred, height * factor, width * factor, factor)
        return _optimise(F.mse_loss(pred.float(), (noise - latents).float()), params, optimizer)

    return step


def reference_step_fn(family: str, base: Path, device: torch.device, dtype: torch.dtype, rank: int,
                      prompt: str) -> StepFn:
    """The reference loop's step for an SDXL or Flux pipeline folder."""
    pipe = load_pipeline(base, device, dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    return {"sdxl": sdxl_step_fn, "flux": flux_step_fn}[family](pipe, prompt, rank, autocast)
