"""LoRA: low-rank adapters on the denoiser's attention projections (and optionally text encoders).

Follows `train_dreambooth_lora.py` / `_sdxl.py` / `_flux.py`: peft `LoraConfig` with Gaussian
init of A and zero B (so step 0 is the base model), alpha = rank unless given, adapters kept in
float32, and the artifact written by the family pipeline's `save_lora_weights`
(`StableDiffusionPipeline`: unet + text_encoder; `StableDiffusionXLPipeline`: unet +
text_encoder + text_encoder_2; `FluxPipeline`: transformer + text_encoder) from
`get_peft_model_state_dict` + `convert_state_dict_to_diffusers`, so `pipe.load_lora_weights(dir)`
loads it. The adapter configs travel as safetensors metadata, so a non-default alpha survives.

Denoiser targets: the job's `target_modules`, except that the default list (SD's attention
projections) means "the family's default" (`family.lora_targets`: for Flux also the context
stream's projections). Text-encoder LoRA goes on the encoders the family trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.utils import get_peft_model_state_dict

from services.common.errors import InvalidInput
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.training.trainers.config import UNET_LORA_TARGETS, TrainConfig
from services.training.trainers.lora_compute import use_merged_compute
from services.training.trainers.method import MethodTrainer
from services.training.trainers.models import Components

CONV_LORA_TARGETS = ("conv1", "conv2", "conv")
"""LoCon's Conv2d targets by module-name suffix: diffusers' resnet convolutions and the
Downsample2D/Upsample2D `conv` (the UNet's conv_in/conv_out/conv_shortcut stay frozen, as in
kohya's LoCon)."""


def denoiser_targets(config: TrainConfig, comps: Components) -> list[str]:
    if sorted(config.target_modules) == sorted(UNET_LORA_TARGETS):
        targets = list(comps.family.lora_targets)
    else:
        targets = list(config.target_modules)
    if config.conv_rank:
        targets += [t for t in CONV_LORA_TARGETS if t not in targets]
    return targets


def conv_patterns(config: TrainConfig) -> tuple[dict[str, int], dict[str, float]]:
    """peft rank/alpha patterns giving the conv targets their own rank and alpha (LoCon)."""
    if not config.conv_rank:
        return {}, {}
    alpha = config.conv_alpha if config.conv_alpha is not None else float(config.conv_rank)
    return ({t: config.conv_rank for t in CONV_LORA_TARGETS}, {t: alpha for t in CONV_LORA_TARGETS})


class LoraTrainer(MethodTrainer):
    kind = "LORA"

    def __init__(self, config: TrainConfig, comps: Components) -> None:
        super().__init__(config, comps)
        denoiser = comps.family.denoiser
        ranks, alphas = conv_patterns(config)
        self.configs: dict[str, LoraConfig] = {
            denoiser: self._lora_config(denoiser_targets(config, comps), ranks, alphas)
        }
        self._attach(comps.denoiser, self.configs[denoiser], "spec.lora.target_modules")
        if config.conv_rank and not any(isinstance(m, LoraConv2d) for m in comps.denoiser.modules()):
            raise InvalidInput("spec.lora.conv_rank", f"the {comps.family.name} denoiser has no Conv2d layer to adapt")
        for name in self.trained_text_encoders:
            self.configs[name] = self._lora_config(config.text_encoder_target_modules)
            self._attach(comps.models[name], self.configs[name], "spec.lora.text_encoder_target_modules")
        models = [comps.models[name] for name in self.configs]
        cast_training_params(models, dtype=torch.float32)
        for model in models:
            use_merged_compute(model)  # the same function, in fewer passes, on small fp32 layers

    def _lora_config(self, targets: list[str], ranks: dict[str, int] | None = None,
                     alphas: dict[str, float] | None = None) -> LoraConfig:
        """peft's config; DoRA adds a magnitude vector per layer (initialised to the base
        weight's norm, so step 0 is still the base model)."""
        c = self.config
        return LoraConfig(
            r=c.rank,
            lora_alpha=c.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; floats work
            lora_dropout=c.dropout,
            init_lora_weights="gaussian",
            target_modules=targets,
            use_dora=c.use_dora,
            rank_pattern=dict(ranks or {}),
            alpha_pattern=dict(alphas or {}),
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
        return {
            f"{name}.{n}": p
            for name in self.configs
            for n, p in self.comps.models[name].named_parameters()
            if p.requires_grad
        }

    def param_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = []
        for name in self.configs:
            params = [p for p in self.comps.models[name].parameters() if p.requires_grad]
            is_denoiser = name == self.comps.family.denoiser
            lr = self.config.effective_learning_rate if is_denoiser else self.config.text_encoder_learning_rate
            groups.append({"params": params, "lr": lr})
        return groups

    def save_artifact(self, out_dir: Path) -> dict[str, Path]:
        """The recipe's file. A conv LoRA's denoiser keeps peft's key names: diffusers' converter
        renames only attention keys (`to_q.lora_A` -> `to_q.lora.down`), and its loader decides
        from the *first* key whether to convert back, so a mixed file whose first key is a conv
        layer would load without its attention weights (seen on SDXL)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {}
        for name, lora in self.configs.items():
            layers = get_peft_model_state_dict(self.comps.models[name])
            if not (self.config.conv_rank and name == self.comps.family.denoiser):
                layers = convert_state_dict_to_diffusers(layers)
            kwargs[f"{name}_lora_layers"] = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
            kwargs[f"{name}_lora_adapter_metadata"] = lora.to_dict()
        pipeline = getattr(diffusers, self.comps.family.pipeline_class)
        pipeline.save_lora_weights(out_dir, safe_serialization=True, **kwargs)
        return {LORA_WEIGHTS_FILE: out_dir / LORA_WEIGHTS_FILE}
