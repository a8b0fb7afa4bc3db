"""The shared training loop behind every method.

Order of work: load the frozen base components (the base model's family decides which, how
prompts condition the denoiser and what it predicts: models.py), seed, make prior-preservation
images if needed (with the untouched base model), set up the method, pre-encode every image
view (and every prompt when the text encoders are frozen), build the optimizer + the lr
schedule, restore a checkpoint if given, then step. Each step's randomness (samples, views,
latent noise, diffusion noise, timesteps or flow sigmas) comes from generators keyed by (seed,
step, micro-batch), and the global RNGs (LoRA dropout) are checkpointed, so a resumed run
reproduces an uninterrupted one.
"""

from __future__ import annotations

import gc
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.common.model_loading import MODEL_LOAD_LOCK
from services.training.trainers import checkpoint as ckpt
from services.training.trainers.base import TrainerCallbacks, TrainImage, TrainResult
from services.training.trainers.batches import MicroBatchSampler, PromptEncoder
from services.training.trainers.cache import LatentCache
from services.training.trainers.captions import CaptionBuilder
from services.training.trainers.config import TrainConfig
from services.training.trainers.data import build_views
from services.training.trainers.dreambooth import DreamBoothTrainer
from services.training.trainers.evaluate import fixed_denoising_loss
from services.training.trainers.heldout import (
    HeldOutSet,
    HeldOutValidation,
    augmented_pixels,
    heldout_pixels,
    holdout_indices,
)
from services.training.trainers.lora import LoraTrainer
from services.training.trainers.loss import diffusion_loss
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components, check_family_options, load_components
from services.training.trainers.optim import build_optimizer, build_scheduler
from services.training.trainers.overfit import ValidationTracker
from services.training.trainers.textual_inversion import TextualInversionTrainer
from services.training.trainers.validation import CLASS_IMAGES_DIR, class_image_paths, validation_images

log = logging.getLogger(__name__)

METHODS: dict[str, type[MethodTrainer]] = {
    "LORA": LoraTrainer,
    "DREAMBOOTH": DreamBoothTrainer,
    "TEXTUAL_INVERSION": TextualInversionTrainer,
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Optimisation:
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    params: list[torch.nn.Parameter]


def build_optimisation(config: TrainConfig, method: MethodTrainer, comps: Components) -> Optimisation:
    optimizer = build_optimizer(config, method.param_groups(), comps.device)
    scheduler = build_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(comps.device.type) if comps.precision == "fp16" else None
    return Optimisation(optimizer, scheduler, scaler, method.trainable_parameters())


class TrainingRun:
    """One call of `run_training`: owns the components, caches, optimizer and loop."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        base_model_dir: Path,
        images: list[TrainImage],
        work_dir: Path,
        callbacks: TrainerCallbacks,
        resume_dir: Path | None,
        device: str,
        class_images: list[TrainImage],
    ) -> None:
        if not images:
            raise ValueError("run_training needs at least one image")
        self.started = time.monotonic()
        self.config, self.callbacks, self.work_dir = config, callbacks, work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.comps = load_components(base_model_dir, device, config.mixed_precision)
        self.resolution = config.resolution or self.comps.native_resolution
        check_family_options(config, self.comps, self.resolution)
        seed_everything(config.seed)
        self.class_images = class_image_paths(config, self.comps, class_images, resume_dir, work_dir, self.resolution)
        with MODEL_LOAD_LOCK:  # adapter injection / embedding resizing build modules too
            self.method = METHODS[config.method](config, self.comps)
        if config.gradient_checkpointing:
            self.method.enable_gradient_checkpointing()
        held = holdout_indices(len(images), config.seed) if config.heldout_validation else []
        self.sampler = self._build_sampler([im for i, im in enumerate(images) if i not in held])
        self.heldout = self._build_heldout(images, held) if config.heldout_validation else None
        self._release_frozen_encoders()
        self.opt = build_optimisation(config, self.method, self.comps)
        self.start_step = 0
        self.extra: dict[str, float] = {}
        if resume_dir is not None:
            self._restore(resume_dir)
        else:
            self.extra["eval_loss_initial"] = self._eval_loss()

    def _captions(self, images: list[TrainImage]) -> CaptionBuilder:
        c = self.config
        return CaptionBuilder(
            instance_prompt=c.instance_prompt,
            captions=[i.caption for i in images],
            dropout=c.caption_dropout,
            shuffle=c.shuffle_tags,
            keep_tokens=c.keep_tokens,
            rewrite=self.method.prompt,
        )

    def _build_heldout(self, images: list[TrainImage], held: list[int]) -> HeldOutValidation:
        """The validation views (heldout.py): the held-out images, or augmentations of the
        training images when there are too few to split; encoded before the VAE goes."""
        if held:
            chosen = [images[i] for i in held]
            pixels = heldout_pixels([i.path for i in chosen], self.resolution)
            prompts = self._captions(chosen).bases()
        else:
            pixels, owners = augmented_pixels([i.path for i in images], self.resolution)
            prompts = [self.sampler.instance_prompts[o] for o in owners]
        self.sampler.encoder.warm(prompts)
        views = HeldOutSet.build(self.comps, pixels, prompts, augmented=not held)
        tracker = ValidationTracker(self.config.overfit_patience)
        return HeldOutValidation(views, tracker, keep_best=self.config.publish == "best")

    def _build_sampler(self, images: list[TrainImage]) -> MicroBatchSampler:
        c = self.config
        instance = build_views([i.path for i in images], self.resolution, c.center_crop, c.random_flip)
        captions = self._captions(images)
        prompts = captions.bases()
        klass = None
        class_prompts: list[str] = []
        if self.class_images:
            klass = build_views([i.path for i in self.class_images], self.resolution, c.center_crop, c.random_flip)
            class_prompts = [i.caption or c.class_prompt for i in self.class_images]
        with torch.no_grad():
            inst_cache = LatentCache.encode(self.comps, instance.pixels)
            class_cache = LatentCache.encode(self.comps, klass.pixels) if klass is not None else None
        encoder = PromptEncoder(self.comps, cached=not self.method.text_encoder_in_graph,
                                open_ended=captions.open_ended)
        encoder.warm(captions.variants() + class_prompts)
        return MicroBatchSampler(
            config=c,
            instance=instance,
            instance_cache=inst_cache,
            instance_prompts=prompts,
            klass=klass,
            class_cache=class_cache,
            class_prompts=class_prompts,
            encoder=encoder,
            captions=captions,
        )

    def _release_frozen_encoders(self) -> None:
        """Drop the VAE (and cached text encoders) once everything is encoded.

        Only sampling (validation previews) needs them again; without validation prompts their
        memory goes back to the host or GPU for activations and optimizer state.
        """
        if self.config.validation_prompts:
            return
        self.comps.models.pop("vae", None)
        if not self.method.text_encoder_in_graph and not self.sampler.encoder.open_ended:
            for slot in self.comps.family.text_encoders:
                self.comps.models.pop(slot.encoder, None)
        gc.collect()

    def _restore(self, resume_dir: Path) -> None:
        state = ckpt.load_state(resume_dir)
        self.method.load_trainable(state.trainable)
        self.opt.optimizer.load_state_dict(state.optimizer)
        self.opt.lr_scheduler.load_state_dict(state.lr_scheduler)
        if self.opt.scaler is not None and state.scaler:
            self.opt.scaler.load_state_dict(state.scaler)
        ckpt.rng_restore(state.rng_tensors, state.rng_meta)
        self.start_step = state.step
        self.extra.update({k: float(v) for k, v in state.extra.get("metrics", {}).items()})
        if self.heldout is not None:
            self.heldout.restore(state.extra.get("validation"), state.best)
        log.info("resumed %s at step %d", self.config.method, state.step)

    def _eval_loss(self) -> float:
        b = self.sampler
        return fixed_denoising_loss(self.comps, b.instance_cache, b.eval_views(), b.eval_embeddings())

    def step(self, step: int) -> float:
        """One optimizer step (gradient_accumulation_steps micro-batches); returns the mean loss."""
        c, o, comps = self.config, self.opt, self.comps
        total = torch.zeros((), device=comps.device)
        for micro in range(c.gradient_accumulation_steps):
            b = self.sampler.batch(step, micro)
            with comps.autocast():
                pred = comps.predict(b.noisy, b.timesteps, b.embeddings)
            loss, _ = diffusion_loss(
                pred,
                b.target,
                b.timesteps,
                comps.schedule,
                snr_gamma=c.snr_gamma,
                num_prior=b.num_prior,
                prior_weight=c.prior_loss_weight,
            )
            scaled = loss / c.gradient_accumulation_steps
            (o.scaler.scale(scaled) if o.scaler is not None else scaled).backward()
            total += scaled.detach()
        if o.scaler is not None:
            o.scaler.unscale_(o.optimizer)
        if c.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(o.params, c.max_grad_norm)
        if o.scaler is not None:
            o.scaler.step(o.optimizer)
            o.scaler.update()
        else:
            o.optimizer.step()
        o.lr_scheduler.step()
        o.optimizer.zero_grad(set_to_none=True)
        return float(total.item())

    def run(self) -> TrainResult:
        c = self.config
        self.method.train_mode()
        losses: list[float] = []
        stopped = False
        step = self.start_step
        while step < c.max_train_steps:
            if self.callbacks.should_stop():
                stopped = True
                break
            loss = self.step(step)
            step += 1
            losses.append(loss)
            self.callbacks.on_step(step, c.max_train_steps, loss, float(self.opt.lr_scheduler.get_last_lr()[0]))
            if self._maybe_validate(step):
                log.warning("stop_on_overfit: ending %s at step %d", c.method, step)
                break
            if step % c.checkpointing_steps == 0 and step < c.max_train_steps:
                self._checkpoint(step)
        stopped = stopped or self.callbacks.should_stop()
        return self._result(step, losses, stopped)

    def _maybe_validate(self, step: int) -> bool:
        """Previews and the validation loss at validation intervals; True: stop (stop_on_overfit)."""
        c = self.config
        if not (c.validation_prompts or self.heldout) or (step % c.validation_steps and step != c.max_train_steps):
            return False
        images: list[tuple[str, bytes]] = []
        if c.validation_prompts:
            images = validation_images(self.comps, c.validation_prompts, self.resolution, c.seed)
        if self.heldout is None:
            loss = self._eval_loss()  # draws no global randomness: resume stays exact
            self.method.train_mode()
            self.callbacks.on_validation(step, images, loss)
            return False
        loss, report, alarm = self.heldout.evaluate(step, self.comps, self.sampler.encoder, self.method)
        self.method.train_mode()
        if alarm:
            log.warning("%s", report["warning"])
        self.callbacks.on_validation(step, images, loss, report)
        return alarm and c.stop_on_overfit

    def _checkpoint(self, step: int) -> None:
        root = self.work_dir / "checkpoints"
        state_dir = root / f"step-{step:07d}"
        ckpt.save_state(
            state_dir,
            step=step,
            trainable=dict(self.method.named_trainable()),
            optimizer=self.opt.optimizer,
            lr_scheduler=self.opt.lr_scheduler,
            scaler=self.opt.scaler,
            extra={"config": self.config.model_dump(mode="json"), "resolution": self.resolution, "metrics": self.extra,
                   "validation": self.heldout.tracker.state() if self.heldout else None},
            best=self.heldout.best if self.heldout else None,
        )
        generated = [i.path for i in self.class_images if i.path.parent == self.work_dir / CLASS_IMAGES_DIR]
        if generated:
            (state_dir / CLASS_IMAGES_DIR).mkdir()
            for path in generated:
                shutil.copy2(path, state_dir / CLASS_IMAGES_DIR / path.name)
        self.callbacks.save_checkpoint(step, state_dir)
        for old in root.iterdir():  # the callback persisted it; keep only the newest locally
            if old != state_dir:
                shutil.rmtree(old, ignore_errors=True)

    def _choose_published(self, step: int) -> dict[str, Any]:
        """publish=best: load the weights of the lowest validation loss; returns what the
        manifest's training_config records about the choice."""
        assert self.heldout is not None
        tracker = self.heldout.tracker
        if self.config.publish == "best" and self.heldout.best is not None:
            self.method.load_trainable(self.heldout.best)
            step = tracker.best_step
        return {"published_step": step, "best_validation_loss": tracker.best_loss,
                "best_validation_step": tracker.best_step}

    def _result(self, step: int, losses: list[float], stopped: bool) -> TrainResult:
        c = self.config
        wall = time.monotonic() - self.started
        ran = step - self.start_step
        metrics = {
            "steps": float(step),
            "wall_seconds": wall,
            "steps_per_second": ran / wall if wall > 0 else 0.0,
            "resumed_from_step": float(self.start_step),
            "num_images": float(len(self.sampler.instance_prompts)),
            "resolution": float(self.resolution),
            **self.extra,
        }
        if losses:
            metrics["final_loss"] = losses[-1]
            metrics["mean_loss_last_10"] = float(np.mean(losses[-10:]))
        files: dict[str, Path] = {}
        published: dict[str, Any] = {}
        if not stopped:
            if self.heldout is not None:
                published = self._choose_published(step)
                metrics.update(self.heldout.metrics(), published_step=float(published["published_step"]))
            self.comps.denoiser.eval()
            metrics["eval_loss_final"] = self._eval_loss()
            files = self.method.save_artifact(self.work_dir / "artifact")
        resolved = c.model_dump(mode="json") | {"resolution": self.resolution, "mixed_precision": self.comps.precision}
        resolved |= published
        return TrainResult(
            kind=c.method,
            files=files,
            trigger_tokens=self.method.trigger_tokens,
            metrics=metrics,
            steps=step,
            stopped=stopped,
            resumed_from_step=self.start_step,
            config=resolved,
        )


def run_training(
    config: TrainConfig,
    *,
    base_model_dir: Path,
    images: list[TrainImage],
    work_dir: Path,
    callbacks: TrainerCallbacks,
    resume_dir: Path | None = None,
    device: str = "cpu",
    class_images: list[TrainImage] | None = None,
) -> TrainResult:
    """Train `config.method` on `images` and write the artifact under `work_dir`.

    `resume_dir` is a directory previously handed to `callbacks.save_checkpoint`; the run
    continues from its step with the same RNG streams, so the result equals an uninterrupted
    run. `class_images` are prior-preservation images (generated with the base model when
    prior preservation is on and fewer than `num_class_images` are given). Importing this
    module imports torch and diffusers: API-only processes never do.
    """
    run = TrainingRun(
        config,
        base_model_dir=base_model_dir,
        images=images,
        work_dir=work_dir,
        callbacks=callbacks,
        resume_dir=resume_dir,
        device=device,
        class_images=class_images or [],
    )
    return run.run()
