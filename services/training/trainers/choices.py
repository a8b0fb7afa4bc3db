"""Optimizer, lr-schedule and caption choices: dependent defaults and checks.

Kept out of config.py so that module stays about the recipe defaults. Everything here is
plain Python (no torch, no proto: the enum numbers are read in services.training.convert),
because the API server validates specs with it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from services.common.config import Settings
from services.common.errors import Violations

if TYPE_CHECKING:
    from services.training.trainers.config import TrainConfig

Optimizer = Literal["adamw", "adamw_8bit", "prodigy", "adafactor"]

PRODIGY_LEARNING_RATE = 1.0  # Prodigy estimates the step size itself; lr is a multiplier on it
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler default end value for "polynomial"
MAX_KEEP_TOKENS = 75  # CLIP's 77 positions less BOS/EOS

_H = "spec.hyperparameters."


def same_schedule(kind_name: str, lr_scheduler: str) -> bool:
    """Whether the `lr_scheduler` string names the schedule `lr_scheduler_kind` chose
    ("constant_with_warmup" is the constant schedule with warm-up)."""
    return lr_scheduler.removesuffix("_with_warmup") == kind_name


def resolve_choices(values: dict[str, Any], hyper: dict[str, Any]) -> None:
    """Defaults that depend on the choices, written into `values` so the manifest records them.

    Prodigy: an unset learning rate (either group) is Prodigy's 1.0 and never batch-scaled.
    A "constant" schedule with warm-up steps is diffusers' constant_with_warmup (plain
    "constant" would silently ignore the warm-up).
    """
    if values.get("optimizer") == "prodigy":
        values["scale_lr"] = False
        if "learning_rate" not in hyper:
            values["learning_rate"] = PRODIGY_LEARNING_RATE
        if "text_encoder_learning_rate" not in hyper:
            values["text_encoder_learning_rate"] = PRODIGY_LEARNING_RATE
    values["lr_scheduler"] = scheduler_name(values.get("lr_scheduler", "constant"), values.get("lr_warmup_steps", 0))


def scheduler_name(name: str, warmup_steps: int) -> str:
    """The diffusers schedule to build: "constant" with warm-up becomes constant_with_warmup."""
    return "constant_with_warmup" if name == "constant" and warmup_steps > 0 else name


def is_cuda_device(device: str) -> bool:
    return device.strip().lower().split(":", 1)[0] == "cuda"


def validate_choices(c: TrainConfig, s: Settings, e: Violations) -> None:
    """Range checks of the optimizer, schedule and caption options (violations go to `e`).

    8-bit AdamW is refused unless the deployment trains on CUDA (`training_device`): the API
    server and the workers share that setting, so the refusal normally comes at
    CreateTrainingJob; a worker configured differently fails the job with the same message.
    """
    e.check(
        c.optimizer != "adamw_8bit" or is_cuda_device(s.training_device),
        _H + "optimizer",
        f"8-bit AdamW (bitsandbytes) needs a CUDA training device; this deployment trains on "
        f"{s.training_device!r}. Use ADAMW, PRODIGY or ADAFACTOR",
    )
    e.check(1 <= c.lr_num_cycles <= 100, _H + "lr_num_cycles", "must be between 1 and 100")
    e.check(0 < c.lr_power <= 10, _H + "lr_power", "must be in (0, 10]")
    if c.lr_scheduler == "polynomial":
        e.check(
            c.effective_learning_rate > POLYNOMIAL_LR_END,
            _H + "learning_rate",
            f"the polynomial schedule decays to {POLYNOMIAL_LR_END}; the rate must be above it",
        )
    e.check(0 <= c.caption_dropout < 1, _H + "caption_dropout", "must be in [0, 1)")
    e.check(
        c.caption_dropout == 0 or c.method != "TEXTUAL_INVERSION",
        _H + "caption_dropout",
        "textual inversion learns only from prompts that contain the placeholder; an empty prompt trains nothing",
    )
    e.check(0 <= c.keep_tokens <= MAX_KEEP_TOKENS, _H + "keep_tokens", f"must be 0..{MAX_KEEP_TOKENS}")
    e.check(c.keep_tokens == 0 or c.shuffle_tags, _H + "keep_tokens", "only applies with shuffle_tags")
