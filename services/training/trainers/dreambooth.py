"""DreamBooth: full fine-tuning of the denoiser (and optionally the family's text encoders).

Follows `train_dreambooth.py` (and its SDXL/Flux variants): every denoiser weight trains in
float32 (mixed precision only through autocast), an identifier in the instance prompt (`a photo
of sks dog`) binds the concept, and prior preservation adds class images. The artifact holds
only the trained components in diffusers layout (`unet/` or `transformer/` with config.json +
safetensors, `text_encoder/`, `text_encoder_2/` when trained), each loadable with
`from_pretrained` and swappable into the base pipeline; the manifest references the base
model for the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from services.training.trainers.config import TrainConfig
from services.training.trainers.method import MethodTrainer, files_under
from services.training.trainers.models import Components


class DreamBoothTrainer(MethodTrainer):
    kind = "DREAMBOOTH"

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        super().__init__(config, comps)
        self.trained = (comps.family.denoiser, *self.trained_text_encoders)
        for name in self.trained:
            module = comps.models[name]
            if module.dtype != torch.float32:
                module.to(dtype=torch.float32)  # trained weights stay float32; autocast does the rest
            module.requires_grad_(True)

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {f"{name}.{n}": p for name in self.trained for n, p in self.comps.models[name].named_parameters()}

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        for name in self.trained:
            lr = (self.config.effective_learning_rate if name == self.comps.family.denoiser
                  else self.config.text_encoder_learning_rate)
            groups.append({"params": list(self.comps.models[name].parameters()), "lr": lr})
        return groups

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in self.trained:
            self.comps.models[name].save_pretrained(out_dir / name, safe_serialization=True)
        return files_under(out_dir)
