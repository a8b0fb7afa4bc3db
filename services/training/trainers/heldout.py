"""Held-out views for the validation loss (`heldout_validation`).

With at least `MIN_SPLIT` images, one in `HOLDOUT_EVERY` (at least one) is held out, chosen
by the seed alone, and never trained on: its loss measures generalisation to unseen views of
the concept. With fewer, nothing can be spared, so the loss is taken on fixed augmentations of
the training images (the mirrored centre crop and a 1/8 zoomed-in centre crop): that measures
how exactly the model memorised the training views rather than generalisation, which is still
what an over-trained run drives up (docs/architecture.md "Validation loss").

The loss is `fixed_denoising_loss` (fixed noise and timesteps) on these views' cached latents,
so it draws no global randomness and a resumed run sees the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.training.trainers.batches import PromptEncoder
from services.training.trainers.cache import LatentCache
from services.training.trainers.data import View, load_rgb, render_view, resize_short_side
from services.training.trainers.evaluate import fixed_denoising_loss
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components
from services.training.trainers.overfit import ValidationTracker

MIN_SPLIT = 4
HOLDOUT_EVERY = 5
HOLDOUT_STREAM = 0x4E1D


def holdout_indices(count: int, seed: int) -> list[int]:
    """Which of `count` images are held out (sorted); none below MIN_SPLIT images."""
    if count < MIN_SPLIT:
        return []
    size = max(1, count // HOLDOUT_EVERY)
    picks = np.random.default_rng([seed, HOLDOUT_STREAM]).choice(count, size=size, replace=False)
    return sorted(int(i) for i in picks)


def _centre(img_path: Path, size: int, flip: bool = False, zoom: float = 1.0) -> np.ndarray:
    img = resize_short_side(load_rgb(img_path), round(size * zoom))
    w, h = img.size
    return render_view(img, View(0, (w - size) // 2, (h - size) // 2, flip), size)


def heldout_pixels(paths: list[Path], size: int) -> np.ndarray:
    """The centre crop of every held-out image."""
    return np.stack([_centre(p, size) for p in paths])


def augmented_pixels(paths: list[Path], size: int) -> tuple[np.ndarray, list[int]]:
    """Two fixed augmentations per training image, and the image index of each view."""
    arrays, owners = [], []
    for i, path in enumerate(paths):
        arrays += [_centre(path, size, flip=True), _centre(path, size, zoom=1.125)]
        owners += [i, i]
    return np.stack(arrays), owners


@dataclass
class HeldOutSet:
    """Encoded validation views and the prompt of each."""

    cache: LatentCache
    prompts: list[str]
    augmented: bool  # True: augmentations of training images (fewer than MIN_SPLIT images)

    @classmethod
    def build(cls, comps: Components, pixels: np.ndarray, prompts: list[str], augmented: bool) -> HeldOutSet:
        with torch.no_grad():
            return cls(LatentCache.encode(comps, pixels), prompts, augmented)

    def loss(self, comps: Components, encoder: PromptEncoder) -> float:
        with torch.no_grad():
            embeddings = encoder(self.prompts)
        return fixed_denoising_loss(comps, self.cache, list(range(len(self.prompts))), embeddings)


@dataclass
class HeldOutValidation:
    """The held-out views, the tracker (best, alarm) and, with publish=best, the best weights."""

    views: HeldOutSet
    tracker: ValidationTracker
    keep_best: bool
    best: dict[str, torch.Tensor] | None = None

    def evaluate(self, step: int, comps: Components, encoder: PromptEncoder,
                 method: MethodTrainer) -> tuple[float, dict[str, Any], bool]:
        """(loss, the report for `on_validation`, whether the overfit alarm fired now)."""
        loss = self.views.loss(comps, encoder)
        seen = self.tracker.observe(step, loss)
        if seen.is_best and self.keep_best:
            self.best = {k: v.detach().float().cpu().clone() for k, v in method.named_trainable().items()}
        t = self.tracker
        report = {"step": step, "loss": loss, "best_loss": t.best_loss, "best_step": t.best_step,
                  "overfit_step": t.overfit_step, "warning": t.warning() if seen.alarm else ""}
        return loss, report, seen.alarm

    def restore(self, state: dict[str, Any] | None, best: dict[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's tracker state and best weights."""
        if state:
            self.tracker = ValidationTracker.from_state(state, self.tracker.patience)
        if self.keep_best:
            self.best = best

    def metrics(self) -> dict[str, float]:
        return {**self.tracker.metrics(), "validation_views": float(len(self.views.prompts)),
                "validation_augmented": float(self.views.augmented)}
