"""What differs between DreamBooth, LoRA and Textual Inversion, behind one small interface.

The shared loop (engine.py) asks a method which parameters train (and at which learning
rates), whether the text encoder participates in the gradient (then prompts are encoded per
step instead of cached), how to rewrite prompts (TI expands multi-vector placeholders), and
how to write the artifact. Checkpoints store `named_trainable()` by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from services.training.trainers.config import TrainConfig
from services.training.trainers.models import Components


class MethodTrainer(ABC):
    """One training method's setup, trainable parameters and artifact layout."""

    kind: str = ""

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        self.config = config
        self.comps = comps

    @property
    def text_encoder_in_graph(self) -> bool:
        """True when gradients flow through the text encoder, so its outputs cannot be cached."""
        return self.config.train_text_encoder

    @property
    def trigger_tokens(self) -> list[str]:
        return self.config.trigger_tokens

    def prompt(self, text: str) -> str:
        """The prompt as the tokenizer should see it during training."""
        return text

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        """Text encoders whose own weights train (the family's choice, with train_text_encoder)."""
        return self.comps.trainable_text_encoders if self.config.train_text_encoder else ()

    @property
    def graph_text_encoders(self) -> tuple[str, ...]:
        """Text encoders gradients flow through (checkpointed and put in train mode)."""
        return self.trained_text_encoders

    def enable_gradient_checkpointing(self) -> None:
        self.comps.denoiser.enable_gradient_checkpointing()
        for name in self.graph_text_encoders:
            self.comps.models[name].gradient_checkpointing_enable()

    def train_mode(self) -> None:
        self.comps.denoiser.train()
        for name in self.graph_text_encoders:
            self.comps.models[name].train()

    @abstractmethod
    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """Every trained parameter by a stable name (the checkpoint keys)."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups with their learning rates."""

    @abstractmethod
    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        """Write the publishable files; return artifact relative path -> local file."""

    @torch.no_grad()
    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checkpointed values into the live parameters (names must match exactly)."""
        params = self.named_trainable()
        if set(params) != set(tensors):
            missing = sorted(set(params) ^ set(tensors))[:5]
            raise ValueError(f"checkpoint parameters do not match this run (e.g. {missing})")
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, dtype=param.dtype))

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.named_trainable().values())


def files_under(root: Path) -> dict[str, Path]:
    """Every file below `root` keyed by its POSIX path relative to `root`."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
