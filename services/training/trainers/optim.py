"""The optimizer and lr schedule a config names.

- adamw: torch AdamW, multi-tensor (`foreach`): the CPU default loops over hundreds of LoRA
  tensors one by one.
- adamw_8bit: bitsandbytes AdamW8bit, imported lazily (not a dependency; CUDA only). Config
  validation refuses it on a non-CUDA deployment; this module refuses it again for the
  device a run actually got, with the same kind of message.
- prodigy: prodigyopt.Prodigy; the group lr multiplies its estimated step size (1.0 default).
- adafactor: transformers Adafactor with the given lr (relative_step, scale_parameter and
  warmup_init off), so the lr schedule and warm-up apply to it like to the others.
Each keeps its whole state in `state_dict()`, which checkpoint.py stores, so resume is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.optimization import get_scheduler

from services.common.errors import FailedPrecondition
from services.training.trainers.choices import scheduler_name
from services.training.trainers.config import TrainConfig

FIELD = "spec.hyperparameters.optimizer"


def build_optimizer(config: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """The optimizer over the method's parameter groups (each group carries its own lr)."""
    betas = (config.adam_beta1, config.adam_beta2)
    decay = config.adam_weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=betas, eps=config.adam_epsilon, weight_decay=decay, foreach=True)
    if config.optimizer == "adamw_8bit":
        return _adamw_8bit(config, groups, device)
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=config.effective_learning_rate, betas=betas, weight_decay=decay)  # type: ignore[no-any-return]
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=config.effective_learning_rate,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=decay,
        )
    raise FailedPrecondition(f"optimizer {config.optimizer!r} is not supported", FIELD)


def _adamw_8bit(config: TrainConfig, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    if device.type != "cuda":
        raise FailedPrecondition(
            f"8-bit AdamW (bitsandbytes) needs a CUDA device; this worker trains on {device.type!r}", FIELD
        )
    try:
        import bitsandbytes as bnb  # type: ignore[import-not-found]
    except ImportError as exc:
        raise FailedPrecondition(
            "8-bit AdamW needs the bitsandbytes package on the worker (pip install bitsandbytes)", FIELD
        ) from exc
    optimizer: torch.optim.Optimizer = bnb.optim.AdamW8bit(
        groups,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        weight_decay=config.adam_weight_decay,
    )
    return optimizer


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule of that name; one scheduler step per optimizer step."""
    scheduler: torch.optim.lr_scheduler.LambdaLR = get_scheduler(
        scheduler_name(config.lr_scheduler, config.lr_warmup_steps),
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    return scheduler
