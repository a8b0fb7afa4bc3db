"""The trainer interface the job worker codes against.

A worker resolves a job into a `TrainConfig`, downloads the base model and the dataset to
local paths, and calls `engine.run_training` (imported lazily: torch) with callbacks that
report progress, answer "stop?" (cancellation or a lost lease), persist checkpoints to the
registry and forward validation images. The trainer never touches the registry or the job store itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None,
                      held_out: dict[str, Any] | None = None) -> None:
        """Validation previews at `validation_steps`: (prompt, PNG bytes) pairs, and the validation
        loss then (the fixed-noise denoising loss of `eval_loss_initial`/`eval_loss_final`; with
        heldout_validation, that loss on the held-out views). `held_out` is passed only by
        heldout_validation runs: {"step", "loss", "best_loss", "best_step", "overfit_step",
        "warning" (non-empty at the evaluation where the overfit alarm fired)}."""


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
