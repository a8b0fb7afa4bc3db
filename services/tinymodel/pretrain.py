"""Pretrain the tiny pipeline from scratch on the procedural shapes world.

Two phases, as latent diffusion was trained: (1) the VAE learns to reconstruct images (MSE plus a
small KL term), then its latent scale is measured and written as `scaling_factor`; (2) with the
VAE frozen, the UNet and the text encoder learn text-conditioned denoising (epsilon MSE under the
DDPM schedule) on captions. A random-initialised pipeline is useless for checking that fine-tuning
learns anything; after this the model draws the shape and colour a prompt names.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPTokenizer

from services.tinymodel import pipeline as tiny
from services.tinymodel.data import ShapesStream, held_out
from services.tinymodel.evaluate import Pipeline, colour_control, held_out_loss
from services.tinymodel.tokenizer import write_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of a pretraining run; the defaults made the committed asset."""

    out_dir: Path
    seed: int = 0
    resolution: int = 32
    batch_size: int = 32
    vae_steps: int = 400
    unet_steps: int = 2500
    vae_lr: float = 1e-3
    unet_lr: float = 6e-4
    kl_weight: float = 1e-4
    warmup_steps: int = 50
    snr_gamma: float = 5.0
    prediction_type: str = "epsilon"
    ema_decay: float = 0.998
    threads: int = 2
    log_every: int = 50
    eval_count: int = 128
    eval_steps: int = 20
    device: str = "cpu"


@dataclass
class PretrainResult:
    """What a run measured; written to PRETRAIN.md next to the weights."""

    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _lr_lambda(warmup: int, total: int) -> object:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _batches(cfg: PretrainConfig, stream_seed: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
    stream = ShapesStream(stream_seed, cfg.resolution)
    while True:
        images, captions = stream.batch(cfg.batch_size)
        yield torch.from_numpy(images).to(cfg.device), captions


def train_vae(vae: torch.nn.Module, cfg: PretrainConfig) -> float:
    """Phase 1: reconstruction + KL; returns the latent scaling factor (1 / latent std)."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.vae_steps))  # type: ignore[arg-type]
    pixels = 3 * cfg.resolution * cfg.resolution
    batches = _batches(cfg, cfg.seed * 1000 + 1)
    for step in range(cfg.vae_steps):
        x, _ = next(batches)
        posterior = vae.encode(x).latent_dist  # type: ignore[operator]
        recon = vae.decode(posterior.sample()).sample  # type: ignore[operator]
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.kl_weight * posterior.kl().mean() / pixels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log.info("vae step %d/%d mse %.4f kl %.1f", step + 1, cfg.vae_steps, mse.item(),
                     posterior.kl().mean().item())
    vae.eval()
    with torch.no_grad():
        images, _ = held_out(256, cfg.resolution)
        latents = vae.encode(torch.from_numpy(images).to(cfg.device)).latent_dist.sample()  # type: ignore[operator]
    return float(1.0 / latents.std())


def train_unet(pipe: Pipeline, cfg: PretrainConfig) -> None:
    """Phase 2: text-conditioned epsilon prediction, UNet and text encoder trained together."""
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    noise_scheduler: Any = tiny.make_noise_scheduler(cfg.prediction_type)
    v_pred = noise_scheduler.config.prediction_type == "v_prediction"
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.unet_steps))  # type: ignore[arg-type]
    unet.train()
    text_encoder.train()
    scale = vae.config.scaling_factor
    batches = _batches(cfg, cfg.seed * 1000 + 2)
    ema = WeightAverage(params, cfg.ema_decay)
    running = 0.0
    for step in range(cfg.unet_steps):
        x, captions = next(batches)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.sample() * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), device=cfg.device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(cfg.device)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        target = noise_scheduler.get_velocity(latents, noise, t) if v_pred else noise
        loss = _weighted_loss(pred, target, t, noise_scheduler.alphas_cumprod.to(cfg.device), cfg.snr_gamma, v_pred)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(step)
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
            log.info("unet step %d/%d loss %.4f (ema %.4f) lr %.2e", step + 1, cfg.unet_steps, loss.item(),
                     running, sched.get_last_lr()[0])
    ema.copy_to_params()
    unet.eval()
    text_encoder.eval()


class WeightAverage:
    """Exponential moving average of weights, the ones diffusion models are sampled with.

    Short, high-learning-rate runs leave the raw weights noisy from the last few batches; the
    average gives a smoother denoiser. The decay warms up as (1 + step) / (10 + step) so the
    random initialisation is forgotten quickly. decay <= 0 turns it off.
    """

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self._params = params
        self._decay = decay
        self._shadow = [p.detach().clone() for p in params] if decay > 0 else []

    @torch.no_grad()
    def update(self, step: int) -> None:
        if self._decay <= 0:
            return
        decay = min(self._decay, (1 + step) / (10 + step))
        for shadow, param in zip(self._shadow, self._params, strict=True):
            shadow.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, param in zip(self._shadow, self._params, strict=True):
            param.copy_(shadow)


def _weighted_loss(pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   snr_gamma: float, v_pred: bool) -> torch.Tensor:
    """MSE to the target (epsilon or v), with Min-SNR-gamma weights when snr_gamma > 0.

    Min-SNR (Hang et al. 2023) caps the weight of the easy low-noise timesteps so the noisy
    ones, where layout and colour are decided, get a fair share of the gradient.
    """
    per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma <= 0:
        return per_sample.mean()
    alpha = alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    weight = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_pred else snr)
    return (per_sample * weight).mean()


def _random_pipeline(tok_dir: Path, cfg: PretrainConfig) -> Pipeline:
    vocab = write_tokenizer(tok_dir)
    torch.manual_seed(cfg.seed)
    return tiny.assemble(tiny.make_vae(cfg.resolution), tiny.make_unet(cfg.resolution),
                         tiny.make_text_encoder(vocab), CLIPTokenizer.from_pretrained(tok_dir),
                         cfg.prediction_type)


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Run both phases from a seeded random init, save the pipeline, return the measurements."""
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _pretrain(cfg)
    finally:
        torch.set_num_threads(previous)


def _pretrain(cfg: PretrainConfig) -> PretrainResult:
    result = PretrainResult()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _random_pipeline(Path(tmp), cfg)
        pipe.set_progress_bar_config(disable=True)
        result.metrics["random_init_heldout_loss"] = held_out_loss(pipe, cfg.eval_count, cfg.resolution)
        pipe.to(cfg.device)
        start = time.monotonic()
        scaling = train_vae(pipe.vae, cfg)
        pipe.vae.register_to_config(scaling_factor=scaling)
        result.seconds["vae"] = time.monotonic() - start
        result.metrics["vae_scaling_factor"] = scaling
        log.info("vae done in %.0f s: scaling_factor %.4f", result.seconds["vae"], scaling)
        start = time.monotonic()
        train_unet(pipe, cfg)
        result.seconds["unet"] = time.monotonic() - start
        pipe.to("cpu")  # every metric is measured on the CPU, as the tests measure it
        pipe.unet.requires_grad_(False)
        result.metrics["vae_heldout_mse"] = _vae_mse(pipe, cfg)
        result.metrics["heldout_loss"] = held_out_loss(pipe, cfg.eval_count, cfg.resolution)
        colours = colour_control(pipe, steps=cfg.eval_steps, resolution=cfg.resolution)
        result.metrics["red_beats_blue"] = colours.wins
        result.metrics["redness_beats_blue"] = colours.redness_wins
        log.info("unet done in %.0f s: held-out loss %.4f (random init %.4f), red>blue %d/10, R-B %d/10",
                 result.seconds["unet"], result.metrics["heldout_loss"],
                 result.metrics["random_init_heldout_loss"], colours.wins, colours.redness_wins)
        tiny.save_pipeline(pipe, cfg.out_dir, Path(tmp))
    return result


@torch.no_grad()
def _vae_mse(pipe: Pipeline, cfg: PretrainConfig) -> float:
    images, _ = held_out(cfg.eval_count, cfg.resolution)
    x = torch.from_numpy(images)
    recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    return float(F.mse_loss(recon, x))


def describe_machine(cfg: PretrainConfig) -> str:
    """One line naming where a run happened, for the reproduction notes."""
    where = f"{platform.machine()} CPU ({os.cpu_count()} cores, {cfg.threads} torch threads)"
    if cfg.device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(cfg.device)} GPU + {where}"
    return f"{where}, torch {torch.__version__}"


def command_line(cfg: PretrainConfig, out_given: bool) -> str:
    """The `atelier` command that repeats this run (every knob spelled out)."""
    out = f" --out {shlex.quote(str(cfg.out_dir))}" if out_given else ""
    return (f"atelier base-model pretrain-tiny{out} --seed {cfg.seed} --vae-steps {cfg.vae_steps}"
            f" --unet-steps {cfg.unet_steps} --unet-lr {cfg.unet_lr} --snr-gamma {cfg.snr_gamma}"
            f" --prediction-type {cfg.prediction_type}"
            f" --ema-decay {cfg.ema_decay}"
            f" --resolution {cfg.resolution} --batch-size {cfg.batch_size} --threads {cfg.threads}"
            f" --eval-images {cfg.eval_count} --eval-steps {cfg.eval_steps} --device {cfg.device}")


def write_report(cfg: PretrainConfig, result: PretrainResult, command: str) -> Path:
    """Write PRETRAIN.md: how to reproduce the weights and what they measured."""
    m, s = result.metrics, result.seconds
    reduction = 1 - m["heldout_loss"] / m["random_init_heldout_loss"]
    seeds_note = f"10 seeds, {cfg.eval_steps} PNDM steps, CFG 7.5"
    redness, raw = int(m.get("redness_beats_blue", -1)), int(m["red_beats_blue"])
    text = f"""# tiny-sd: pretraining record

Reproduce (from the repository root):

    {command}

| setting | value |
|---|---|
| seed | {cfg.seed} |
| resolution | {cfg.resolution} px (latents {cfg.resolution // 2}x{cfg.resolution // 2}x4) |
| batch size | {cfg.batch_size} |
| VAE steps / lr / KL weight | {cfg.vae_steps} / {cfg.vae_lr} / {cfg.kl_weight} |
| UNet + text encoder steps / lr | {cfg.unet_steps} / {cfg.unet_lr} (warm-up {cfg.warmup_steps}, cosine to 10%) |
| objective | {cfg.prediction_type} MSE, Min-SNR gamma {cfg.snr_gamma} (0 = unweighted) |
| weight EMA decay | {cfg.ema_decay} (0 = off; the saved weights are the average) |
| machine | {describe_machine(cfg)} |
| wall time | VAE {s["vae"]:.0f} s, UNet + text encoder {s["unet"]:.0f} s, total {s["vae"] + s["unet"]:.0f} s |

| metric (held-out split, {cfg.eval_count} images, fixed noise/timesteps) | value |
|---|---|
| VAE reconstruction MSE (pixels in [-1, 1]) | {m["vae_heldout_mse"]:.4f} |
| VAE scaling_factor (1 / latent std) | {m["vae_scaling_factor"]:.4f} |
| denoising loss, random init (same seed) | {m["random_init_heldout_loss"]:.4f} |
| denoising loss, pretrained | {m["heldout_loss"]:.4f} ({reduction:.0%} lower) |
| "a red X" has higher mean(R) - mean(B) than "a blue X" (acceptance; {seeds_note}) | {redness}/10 |
| "a red X" has the higher whole-image mean red channel (background-dominated) | {raw}/10 |

Training runs on whatever CPU it gets, so wall time varies with load; float results can differ in
the last digits across CPUs and torch builds, the acceptance margins do not.
"""
    path = cfg.out_dir / "PRETRAIN.md"
    path.write_text(text)
    return path
