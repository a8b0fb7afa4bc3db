"""LoRA: low-rank adapters on the UNet's attention projections (and optionally the text encoder).

Follows `train_dreambooth_lora.py` / `train_text_to_image_lora.py`: peft `LoraConfig` with
Gaussian init of A and zero B (so step 0 is the base model), alpha = rank unless given, adapters
kept in float32, and the artifact written by `StableDiffusionPipeline.save_lora_weights` from
`get_peft_model_state_dict` + `convert_state_dict_to_diffusers`, so `pipe.load_lora_weights(dir)`
loads it. The adapter config travels as safetensors metadata, so a non-default alpha survives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from services.common.errors import InvalidInput
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.training.trainers.config import TrainConfig
from services.training.trainers.lora_compute import use_merged_compute
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components


class LoraTrainer(MethodTrainer):
    kind = "LORA"

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        super().__init__(config, comps)
        self.unet_config = self._lora_config(config.target_modules)
        self._attach(comps.unet, self.unet_config, "spec.lora.target_modules")
        self.text_config: LoraConfig | None = None
        if config.train_text_encoder:
            self.text_config = self._lora_config(config.text_encoder_target_modules)
            self._attach(comps.text_encoder, self.text_config, "spec.lora.text_encoder_target_modules")
        cast_training_params([comps.unet, comps.text_encoder], dtype=torch.float32)
        for model in (comps.unet, comps.text_encoder):
            use_merged_compute(model)  # the same function, in fewer passes, on small fp32 layers

    def _lora_config(self, targets: list[str]) -> LoraConfig:
        c = self.config
        return LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; floats work
            lora_dropout=c.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
        )

    @staticmethod
    def _attach(model: Any, config: LoraConfig, field: str) -> None:
        """Inject LoRA layers through peft directly.

        diffusers' `add_adapter` would do for the UNet, but transformers 5's `add_adapter` wants
        peft >= 0.22 and the project pins 0.21; `inject_adapter_in_model` + the `peft_config`
        attribute is exactly what both wrappers do, and `get_peft_model_state_dict` reads it.
        """
        try:
            inject_adapter_in_model(config, model, adapter_name="default")
        except ValueError as exc:  # peft: no module matched the targets
            raise InvalidInput(field, f"no layer of the base model matches: {exc}") from exc
        model.peft_config = {"default": config}
        if hasattr(model, "_hf_peft_config_loaded"):
            model._hf_peft_config_loaded = True

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        out = {f"unet.{n}": p for n, p in self.comps.unet.named_parameters() if p.requires_grad}
        if self.text_config is not None:
            out.update(
                {f"text_encoder.{n}": p for n, p in self.comps.text_encoder.named_parameters() if p.requires_grad}
            )
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = [
            {
                "params": [p for n, p in self.named_trainable().items() if n.startswith("unet.")],
                "lr": self.config.effective_learning_rate,
            }
        ]
        if self.text_config is not None:
            groups.append(
                {
                    "params": [p for n, p in self.named_trainable().items() if n.startswith("text_encoder.")],
                    "lr": self.config.text_encoder_learning_rate,
                }
            )
        return groups

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.comps.unet))
        text_layers = None
        text_meta = None
        if self.text_config is not None:
            text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.comps.text_encoder))
            text_meta = self.text_config.to_dict()
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers={k: v.detach().float().cpu().contiguous() for k, v in unet_layers.items()},
            text_encoder_lora_layers=(
                {k: v.detach().float().cpu().contiguous() for k, v in text_layers.items()} if text_layers else None
            ),
            unet_lora_adapter_metadata=self.unet_config.to_dict(),
            text_encoder_lora_adapter_metadata=text_meta,
            safe_serialization=True,
        )
        return {LORA_WEIGHTS_FILE: out_dir / LORA_WEIGHTS_FILE}
