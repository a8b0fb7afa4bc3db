"""Loading the base model's components for training, with device and precision handling.

The base model's family (services.families.detect) decides what is loaded and how it is used:
its denoiser (UNet or Flux transformer), its text encoders and tokenizers, and its training
module (`family.part("training")`: prompt conditioning, the denoiser call, the objective).
Each component is loaded with the class its `model_index.json` names, so nothing here
branches on a pipeline class. A pipeline of no known family fails with FailedPrecondition.

Frozen components are cast to the half-precision weight dtype on accelerators (as the recipes
do); trainable parameters always stay float32 and mixed precision runs under autocast. On the
CPU everything is float32: half-precision matmuls there are slower than float32, not faster.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.common.model_loading import MODEL_LOAD_LOCK
from services.families import ModelFamily, detect
from services.training.trainers.config import TrainConfig, validate_against_family
from services.training.trainers.noise import Schedule

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FIELD = "spec.base_model"


def resolve_precision(requested: str, device: torch.device) -> str:
    """ "auto" -> bf16 where the GPU supports it, else fp16 on CUDA; float32 ("no") on CPU."""
    if device.type != "cuda":
        return "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return requested


@dataclass
class Components:
    """The pipeline pieces a trainer works with, already on the training device.

    `models` maps component names ("vae", "unet" | "transformer", "text_encoder", ...) to the
    loaded modules (typed Any: the lazy-module classes confuse mypy); a released one is gone.
    """

    family: ModelFamily
    recipe: ModuleType  # family.part("training")
    models: dict[str, Any]
    tokenizers: dict[str, Any]
    schedule: Schedule
    device: torch.device
    precision: str  # "no" | "fp16" | "bf16"
    base_model_dir: Path
    vae_scale_factor: int = 8
    denoiser_config: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]

    @property
    def denoiser(self) -> Any:
        return self.models[self.family.denoiser]

    @property
    def unet(self) -> Any:
        """The denoiser under its SD name (a Flux transformer too)."""
        return self.denoiser

    @property
    def text_encoder(self) -> Any:
        return self.models.get("text_encoder")

    @property
    def vae(self) -> Any:
        return self.models.get("vae")

    @property
    def tokenizer(self) -> Any:
        return self.tokenizers["tokenizer"]

    @property
    def trainable_text_encoders(self) -> tuple[str, ...]:
        """The encoders `train_text_encoder` trains (the family says which: SDXL both CLIPs,
        Flux CLIP-L only)."""
        return tuple(self.recipe.TRAINABLE_TEXT_ENCODERS)

    @property
    def native_resolution(self) -> int:
        """The resolution the base model was trained at (512 for SD 1.5)."""
        return int(self.recipe.native_resolution(self.denoiser_config, self.vae_scale_factor))

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        if self.precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.weight_dtype)

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning for `prompts` (a dict of batch-first tensors)."""
        return self.recipe.encode_prompts(self.models, self.tokenizers, prompts, self.device)  # type: ignore[no-any-return]

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        size = (noisy.shape[-2] * self.vae_scale_factor, noisy.shape[-1] * self.vae_scale_factor)
        return self.recipe.predict(self.denoiser, noisy, timesteps, cond, size)  # type: ignore[no-any-return]


def family_of(base_model_dir: Path) -> ModelFamily:
    """The base model's family; FailedPrecondition (naming spec.base_model) when none fits."""
    try:
        return detect(base_model_dir)
    except FailedPrecondition as exc:
        raise FailedPrecondition(f"base model cannot be trained: {exc}", FIELD) from None


def check_pipeline(base_model_dir: Path) -> ModelFamily:
    """Refuse pipelines of no family these trainers know."""
    return family_of(base_model_dir)


def _component_class(index: dict[str, Any], name: str) -> Any:
    library, class_name = index[name]
    return getattr(importlib.import_module(library), class_name)


def _load_model(base_model_dir: Path, index: dict[str, Any], name: str, dtype: torch.dtype) -> Any:
    cls = _component_class(index, name)
    key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
    return cls.from_pretrained(base_model_dir / name, **{key: dtype})


def load_components(base_model_dir: Path, device: str, precision: str) -> Components:
    """Load the family's tokenizers, text encoders, VAE, denoiser and objective; all frozen."""
    family = check_pipeline(base_model_dir)
    index = json.loads((base_model_dir / "model_index.json").read_text())
    dev = torch.device(device)
    resolved = resolve_precision(precision, dev)
    dtype = _DTYPES[resolved]
    recipe = family.part("training")
    scheduler_config = json.loads((base_model_dir / "scheduler" / "scheduler_config.json").read_text())

    with MODEL_LOAD_LOCK:  # loads patch torch globals: services/common/model_loading.py
        models: dict[str, Any] = {}
        # Move each model as soon as it is loaded: host memory then peaks at the largest
        # component, not at the sum of all of them.
        for name in ("vae", *family.components):
            models[name] = _load_model(base_model_dir, index, name, dtype).requires_grad_(False).eval().to(dev)
        tokenizers = {
            slot.tokenizer: _component_class(index, slot.tokenizer).from_pretrained(base_model_dir / slot.tokenizer)
            for slot in family.text_encoders
        }
    vae_config = models["vae"].config
    return Components(
        family=family, recipe=recipe, models=models, tokenizers=tokenizers,
        schedule=recipe.make_schedule(scheduler_config), device=dev, precision=resolved,
        base_model_dir=base_model_dir, vae_scale_factor=int(2 ** (len(vae_config["block_out_channels"]) - 1)),
        denoiser_config=dict(models[family.denoiser].config),
    )


def check_family_options(config: TrainConfig, comps: Components, resolution: int) -> None:
    """Options the base model's family cannot honour fail the job clearly (FailedPrecondition)."""
    validate_against_family(config, comps.family.name)
    multiple = comps.vae_scale_factor * int(comps.recipe.LATENT_MULTIPLE)
    if resolution % multiple:
        raise FailedPrecondition(
            f"{comps.family.title} needs a resolution that is a multiple of {multiple}; got {resolution}",
            "spec.hyperparameters.resolution",
        )
