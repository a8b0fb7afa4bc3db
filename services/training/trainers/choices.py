"""Optimizer, lr-schedule and caption choices: proto enums -> config values, defaults, checks.

Kept out of config.py so that module stays about the recipe defaults. Everything here is
plain Python (no torch import), because the API server validates specs with it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput

if TYPE_CHECKING:
    from services.training.trainers.config import TrainConfig

Optimizer = Literal["adamw", "adamw_8bit", "prodigy", "adafactor"]

OPTIMIZERS: dict[int, Optimizer] = {
    training_pb2.OPTIMIZER_KIND_UNSPECIFIED: "adamw",
    training_pb2.OPTIMIZER_KIND_ADAMW: "adamw",
    training_pb2.OPTIMIZER_KIND_ADAMW_8BIT: "adamw_8bit",
    training_pb2.OPTIMIZER_KIND_PRODIGY: "prodigy",
    training_pb2.OPTIMIZER_KIND_ADAFACTOR: "adafactor",
}
SCHEDULER_KINDS: dict[int, str] = {
    training_pb2.LR_SCHEDULER_KIND_CONSTANT: "constant",
    training_pb2.LR_SCHEDULER_KIND_LINEAR: "linear",
    training_pb2.LR_SCHEDULER_KIND_COSINE: "cosine",
    training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS: "cosine_with_restarts",
    training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL: "polynomial",
}
PRODIGY_LEARNING_RATE = 1.0  # Prodigy estimates the step size itself; lr is a multiplier on it
POLYNOMIAL_LR_END = 1e-7  # diffusers' get_scheduler default end value for "polynomial"
MAX_KEEP_TOKENS = 75  # CLIP's 77 positions less BOS/EOS

_H = "spec.hyperparameters."


def choice_values(h: training_pb2.Hyperparameters, hyper: dict[str, Any]) -> dict[str, Any]:
    """Config values for the enum fields; `hyper` holds the optional fields already read."""
    out: dict[str, Any] = {}
    if h.optimizer not in OPTIMIZERS:
        raise InvalidInput(_H + "optimizer", "unknown optimizer kind")
    out["optimizer"] = OPTIMIZERS[h.optimizer]
    if h.lr_scheduler_kind:
        if h.lr_scheduler_kind not in SCHEDULER_KINDS:
            raise InvalidInput(_H + "lr_scheduler_kind", "unknown scheduler kind")
        name = SCHEDULER_KINDS[h.lr_scheduler_kind]
        given = hyper.get("lr_scheduler")
        if given is not None and given.removesuffix("_with_warmup") != name:
            raise InvalidInput(_H + "lr_scheduler_kind", f"{name!r} conflicts with lr_scheduler {given!r}")
        out["lr_scheduler"] = name
    return out


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


def _check(ok: bool, field: str, description: str) -> None:
    if not ok:
        raise InvalidInput(field, description)


def is_cuda_device(device: str) -> bool:
    return device.strip().lower().split(":", 1)[0] == "cuda"


def validate_choices(c: TrainConfig, s: Settings) -> None:
    """Range checks of the optimizer, schedule and caption options.

    8-bit AdamW is refused unless the deployment trains on CUDA (`training_device`): the API
    server and the workers share that setting, so the refusal normally comes at
    CreateTrainingJob; a worker configured differently fails the job with the same message.
    """
    _check(
        c.optimizer != "adamw_8bit" or is_cuda_device(s.training_device),
        _H + "optimizer",
        f"8-bit AdamW (bitsandbytes) needs a CUDA training device; this deployment trains on "
        f"{s.training_device!r}. Use ADAMW, PRODIGY or ADAFACTOR",
    )
    _check(1 <= c.lr_num_cycles <= 100, _H + "lr_num_cycles", "must be between 1 and 100")
    _check(0 < c.lr_power <= 10, _H + "lr_power", "must be in (0, 10]")
    if c.lr_scheduler == "polynomial":
        _check(
            c.effective_learning_rate > POLYNOMIAL_LR_END,
            _H + "learning_rate",
            f"the polynomial schedule decays to {POLYNOMIAL_LR_END}; the rate must be above it",
        )
    _check(0 <= c.caption_dropout < 1, _H + "caption_dropout", "must be in [0, 1)")
    _check(
        c.caption_dropout == 0 or c.method != "TEXTUAL_INVERSION",
        _H + "caption_dropout",
        "textual inversion learns only from prompts that contain the placeholder; an empty prompt trains nothing",
    )
    _check(0 <= c.keep_tokens <= MAX_KEEP_TOKENS, _H + "keep_tokens", f"must be 0..{MAX_KEEP_TOKENS}")
    _check(c.keep_tokens == 0 or c.shuffle_tags, _H + "keep_tokens", "only applies with shuffle_tags")
