"""The trainer interface the job worker codes against.

A worker resolves a job into a `TrainConfig`, downloads the base model and the dataset to
local paths, and calls `run_training` with callbacks that report progress, answer "stop?"
(cancellation or a lost lease), persist checkpoints to the registry and forward validation
images. The trainer never touches the registry or the job store itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from services.training.trainers.config import TrainConfig


@dataclass
class TrainImage:
    """One training image on local disk; an empty caption means "use the instance prompt"."""

    path: Path
    caption: str = ""


class TrainerCallbacks(Protocol):
    """What the trainer tells (and asks) the worker while it runs."""

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        """After every optimizer step: progress, and the worker's chance to heartbeat."""

    def should_stop(self) -> bool:
        """Checked before every step; True (cancelled, lease lost) ends the run with stopped=True."""

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        """Persist `state_dir` (a complete resumable state) every `checkpointing_steps` steps."""

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None) -> None:
        """Validation previews at `validation_steps`: (prompt, PNG bytes) pairs, and the validation
        loss then (the fixed-noise denoising loss of `eval_loss_initial`/`eval_loss_final`)."""


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced.

    `files` maps an artifact's relative path (as it appears in the manifest) to the local
    file. When `stopped` is True the run was interrupted by `should_stop` and nothing must be
    published.
    """

    kind: str
    files: dict[str, Path]
    trigger_tokens: list[str]
    metrics: dict[str, float]
    steps: int
    stopped: bool
    resumed_from_step: int = 0
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (resolution etc.)


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
    prior preservation is on and fewer than `num_class_images` are given).
    """
    from services.training.trainers.engine import train  # heavy imports (torch, diffusers) stay lazy

    return train(
        config,
        base_model_dir=base_model_dir,
        images=images,
        work_dir=work_dir,
        callbacks=callbacks,
        resume_dir=resume_dir,
        device=device,
        class_images=class_images or [],
    )
