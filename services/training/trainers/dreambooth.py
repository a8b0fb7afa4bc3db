"""DreamBooth: full fine-tuning of the UNet (and optionally the text encoder).

Follows `train_dreambooth.py`: every UNet weight trains in float32 (mixed precision only
through autocast), an identifier in the instance prompt (`a photo of sks dog`) binds the
concept, and prior preservation adds class images. The artifact holds only the trained
components in diffusers layout (`unet/config.json` + `unet/diffusion_pytorch_model.safetensors`,
`text_encoder/...` when trained); the manifest references the base model for the rest.
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
        trained = [comps.unet, comps.text_encoder] if config.train_text_encoder else [comps.unet]
        for module in trained:
            if module.dtype != torch.float32:
                module.to(dtype=torch.float32)  # trained weights stay float32; autocast does the rest
            module.requires_grad_(True)

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        out = {f"unet.{n}": p for n, p in self.comps.unet.named_parameters()}
        if self.config.train_text_encoder:
            out.update({f"text_encoder.{n}": p for n, p in self.comps.text_encoder.named_parameters()})
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {"params": list(self.comps.unet.parameters()), "lr": self.config.effective_learning_rate}
        ]
        if self.config.train_text_encoder:
            groups.append(
                {"params": list(self.comps.text_encoder.parameters()), "lr": self.config.text_encoder_learning_rate}
            )
        return groups

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.comps.unet.save_pretrained(out_dir / "unet", safe_serialization=True)
        if self.config.train_text_encoder:
            self.comps.text_encoder.save_pretrained(out_dir / "text_encoder")
        return files_under(out_dir)
