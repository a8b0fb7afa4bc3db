"""The training configuration: one pydantic model, filled from the proto with recipe defaults.

Every optional field of `TrainingJobSpec` that the caller leaves unset takes the value the
diffusers reference recipe uses for that method (the README command lines of
`examples/dreambooth/train_dreambooth.py`, `train_dreambooth_lora.py` and
`examples/textual_inversion/textual_inversion.py`), so a job created with only a method, a
base model, a dataset and a prompt behaves like the recipe. The resolved config is plain
JSON (`model_dump(mode="json")`), which the job store persists and the manifest records.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

from pydantic import BaseModel, Field

from atelier_api.v1 import common_pb2, training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training.trainers.choices import Optimizer, choice_values, resolve_choices, validate_choices

Method = Literal["LORA", "DREAMBOOTH", "TEXTUAL_INVERSION"]
Precision = Literal["auto", "no", "fp16", "bf16"]

LR_SCHEDULERS = frozenset(
    {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
)
_KIND_TO_METHOD: dict[int, Method] = {
    common_pb2.ADAPTER_KIND_LORA: "LORA",
    common_pb2.ADAPTER_KIND_DREAMBOOTH: "DREAMBOOTH",
    common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION: "TEXTUAL_INVERSION",
}
METHOD_TO_KIND: dict[str, int] = {v: k for k, v in _KIND_TO_METHOD.items()}
_PRECISION: dict[int, Precision] = {
    training_pb2.MIXED_PRECISION_UNSPECIFIED: "auto",
    training_pb2.MIXED_PRECISION_NO: "no",
    training_pb2.MIXED_PRECISION_FP16: "fp16",
    training_pb2.MIXED_PRECISION_BF16: "bf16",
}

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]

# Per-method reference defaults (the README recipes; see docs/architecture.md "Trainers").
RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "LORA": {
        "learning_rate": 1e-4,
        "max_train_steps": 500,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 100,
        "random_flip": False,
        "max_grad_norm": 1.0,
        "text_encoder_learning_rate": 5e-6,
        "scale_lr": False,
    },
    "DREAMBOOTH": {
        "learning_rate": 5e-6,
        "max_train_steps": 400,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 500,
        "random_flip": False,
        "max_grad_norm": 1.0,
        "text_encoder_learning_rate": 5e-6,
        "scale_lr": False,
    },
    "TEXTUAL_INVERSION": {
        # The recipe passes 5e-4 with --scale_lr: effective lr = 5e-4 * batch * accumulation.
        "learning_rate": 5e-4,
        "max_train_steps": 3000,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 4,
        "lr_warmup_steps": 0,
        "checkpointing_steps": 500,
        "random_flip": True,
        "max_grad_norm": 0.0,
        "text_encoder_learning_rate": 5e-4,
        "scale_lr": True,
    },
}
PRIOR_PRESERVATION_STEPS = 800  # the DreamBooth README doubles the steps with prior preservation


class TrainConfig(BaseModel):
    """Everything one training run needs besides the images and the base model's files."""

    method: Method
    base_model: str
    dataset_id: str
    output_name: str
    output_alias: str = ""
    description: str = ""
    instance_prompt: str = ""
    # prior preservation (DreamBooth and LoRA)
    with_prior_preservation: bool = False
    class_prompt: str = ""
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_dataset_id: str = ""
    # textual inversion
    placeholder_token: str = ""
    initializer_token: str = ""
    num_vectors: int = 1
    # LoRA (alpha defaults to rank, as the recipe does)
    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    target_modules: list[str] = Field(default_factory=lambda: list(UNET_LORA_TARGETS))
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: list(TEXT_ENCODER_LORA_TARGETS))
    # hyper-parameters
    learning_rate: float = 1e-4
    scale_lr: bool = False
    max_train_steps: int = 500
    train_batch_size: int = 1
    resolution: int | None = Field(None, description="None: the base model's native size.")
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    optimizer: Optimizer = "adamw"
    # captions (see captions.py): per-step dropout to the empty prompt, seeded tag shuffling
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    seed: int = 0
    mixed_precision: Precision = "auto"
    gradient_checkpointing: bool = False
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    center_crop: bool = False
    random_flip: bool = False
    checkpointing_steps: int = 500
    validation_steps: int = 100
    validation_prompts: list[str] = Field(default_factory=list)
    train_text_encoder: bool = False
    text_encoder_learning_rate: float = 5e-6
    max_grad_norm: float = 1.0
    adam_weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8

    @property
    def effective_learning_rate(self) -> float:
        """The optimizer's lr: scaled by batch and accumulation when `scale_lr` (the TI recipe)."""
        if self.scale_lr:
            return self.learning_rate * self.train_batch_size * self.gradient_accumulation_steps
        return self.learning_rate

    @property
    def trigger_tokens(self) -> list[str]:
        """Tokens a prompt uses to invoke the concept (TI: every placeholder vector token)."""
        if self.method == "TEXTUAL_INVERSION":
            return placeholder_tokens(self.placeholder_token, self.num_vectors)
        return []

    @classmethod
    def from_proto(cls, spec: training_pb2.TrainingJobSpec, seed: int | None = None) -> TrainConfig:
        """Resolve a spec: unset optional fields take the method's recipe default.

        An unset seed is drawn here (or taken from `seed`) and recorded, so every attempt of
        the job, including a resumed one, uses the same seed.
        """
        if spec.method not in _KIND_TO_METHOD:
            raise InvalidInput("spec.method", "must be LORA, DREAMBOOTH or TEXTUAL_INVERSION")
        method = _KIND_TO_METHOD[spec.method]
        values: dict[str, Any] = dict(RECIPE_DEFAULTS[method])
        values.update(
            method=method,
            base_model=spec.base_model,
            dataset_id=spec.dataset_id,
            output_name=spec.output_name,
            output_alias=spec.output_alias,
            description=spec.description,
            instance_prompt=spec.instance_prompt,
        )
        values.update(_prior_values(spec.prior_preservation))
        if values["with_prior_preservation"] and not spec.hyperparameters.HasField("max_train_steps"):
            values["max_train_steps"] = PRIOR_PRESERVATION_STEPS
        values.update(_ti_values(spec.textual_inversion))
        if method == "TEXTUAL_INVERSION" and not values["instance_prompt"] and values["placeholder_token"]:
            values["instance_prompt"] = f"a photo of a {values['placeholder_token']}"
        values.update(_lora_values(spec.lora))
        hyper = _hyper_values(spec.hyperparameters)
        if "learning_rate" in hyper:
            values["scale_lr"] = False  # an explicit rate is used as given
        values.update(hyper)
        resolve_choices(values, hyper)
        if "seed" not in values:
            values["seed"] = seed if seed is not None else secrets.randbelow(2**31)
        return cls(**values)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ... : the diffusers TI recipe's multi-vector token names."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def _prior_values(pp: training_pb2.PriorPreservation) -> dict[str, Any]:
    out: dict[str, Any] = {
        "with_prior_preservation": pp.enabled,
        "class_prompt": pp.class_prompt,
        "class_dataset_id": pp.class_dataset_id,
    }
    if pp.HasField("weight"):
        out["prior_loss_weight"] = pp.weight
    if pp.HasField("num_class_images"):
        out["num_class_images"] = pp.num_class_images
    return out


def _ti_values(ti: training_pb2.TextualInversionOptions) -> dict[str, Any]:
    out: dict[str, Any] = {"placeholder_token": ti.placeholder_token, "initializer_token": ti.initializer_token}
    if ti.HasField("num_vectors"):
        out["num_vectors"] = ti.num_vectors
    return out


def _lora_values(lora: training_pb2.LoraOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if lora.HasField("rank"):
        out["rank"] = lora.rank
    out["alpha"] = lora.alpha if lora.HasField("alpha") else float(out.get("rank", 4))
    if lora.HasField("dropout"):
        out["dropout"] = lora.dropout
    if lora.target_modules:
        out["target_modules"] = list(lora.target_modules)
    if lora.text_encoder_target_modules:
        out["text_encoder_target_modules"] = list(lora.text_encoder_target_modules)
    return out


_OPTIONAL_HYPER = (
    "learning_rate", "max_train_steps", "train_batch_size", "resolution", "gradient_accumulation_steps",
    "lr_scheduler", "lr_warmup_steps", "seed", "gradient_checkpointing", "snr_gamma", "noise_offset",
    "center_crop", "random_flip", "checkpointing_steps", "validation_steps", "train_text_encoder",
    "text_encoder_learning_rate", "max_grad_norm", "adam_weight_decay", "lr_num_cycles", "lr_power",
    "caption_dropout", "shuffle_tags", "keep_tokens",
)  # fmt: skip


def _hyper_values(h: training_pb2.Hyperparameters) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: getattr(h, name) for name in _OPTIONAL_HYPER if h.HasField(name)  # type: ignore[arg-type]
    }
    out["mixed_precision"] = _PRECISION.get(h.mixed_precision, "auto")
    if h.validation_prompts:
        out["validation_prompts"] = list(h.validation_prompts)
    out.update(choice_values(h, out))
    return out


def _check(ok: bool, field: str, description: str) -> None:
    if not ok:
        raise InvalidInput(field, description)


_H = "spec.hyperparameters."


def validate_config(config: TrainConfig, settings: Settings) -> None:
    """Raise InvalidInput naming the proto field of the first out-of-range value.

    Checks that need the base model's tokenizer live in `validate_against_tokenizer`.
    """
    _check(bool(config.base_model), "spec.base_model", "must not be empty")
    _check(bool(config.dataset_id), "spec.dataset_id", "must not be empty")
    _check(bool(config.output_name), "spec.output_name", "must not be empty")
    _validate_hyper(config, settings)
    validate_choices(config, settings)
    if config.method == "LORA":
        _validate_lora(config)
    if config.method == "TEXTUAL_INVERSION":
        _validate_ti(config)
    _validate_prompts(config)
    if config.with_prior_preservation:
        _validate_prior(config)


def _validate_hyper(c: TrainConfig, s: Settings) -> None:
    _check(0 < c.learning_rate <= 1, _H + "learning_rate", "must be in (0, 1]")
    _check(0 < c.text_encoder_learning_rate <= 1, _H + "text_encoder_learning_rate", "must be in (0, 1]")
    _check(
        1 <= c.max_train_steps <= s.max_train_steps,
        _H + "max_train_steps",
        f"must be between 1 and {s.max_train_steps}",
    )
    _check(
        1 <= c.train_batch_size <= s.max_train_batch_size,
        _H + "train_batch_size",
        f"must be between 1 and {s.max_train_batch_size}",
    )
    if c.resolution is not None:
        _check(
            16 <= c.resolution <= s.max_train_resolution and c.resolution % 8 == 0,
            _H + "resolution",
            f"must be a multiple of 8 between 16 and {s.max_train_resolution}",
        )
    _check(1 <= c.gradient_accumulation_steps <= 128, _H + "gradient_accumulation_steps", "must be 1..128")
    _check(c.lr_scheduler in LR_SCHEDULERS, _H + "lr_scheduler", f"must be one of {sorted(LR_SCHEDULERS)}")
    _check(0 <= c.lr_warmup_steps <= c.max_train_steps, _H + "lr_warmup_steps", "must be 0..max_train_steps")
    _check(0 <= c.seed < 2**63, _H + "seed", "must be below 2**63")
    _check(0 <= c.snr_gamma <= 100, _H + "snr_gamma", "must be 0 (off) .. 100")
    _check(0 <= c.noise_offset <= 1, _H + "noise_offset", "must be in [0, 1]")
    _check(c.checkpointing_steps >= 1, _H + "checkpointing_steps", "must be at least 1")
    _check(c.validation_steps >= 1, _H + "validation_steps", "must be at least 1")
    _check(len(c.validation_prompts) <= 8, _H + "validation_prompts", "at most 8 prompts")
    for i, prompt in enumerate(c.validation_prompts):
        _check(0 < len(prompt) <= 1000, f"{_H}validation_prompts[{i}]", "must be 1..1000 characters")
    _check(0 <= c.max_grad_norm <= 1e4, _H + "max_grad_norm", "must be 0 (off) .. 1e4")
    _check(0 <= c.adam_weight_decay <= 1, _H + "adam_weight_decay", "must be in [0, 1]")
    _check(
        not (c.train_text_encoder and c.method == "TEXTUAL_INVERSION"),
        _H + "train_text_encoder",
        "textual inversion trains only the new embeddings",
    )


def _validate_prompts(c: TrainConfig) -> None:
    _check(bool(c.instance_prompt.strip()), "spec.instance_prompt", "must not be empty")
    _check(len(c.instance_prompt) <= 1000, "spec.instance_prompt", "at most 1000 characters")


def _validate_lora(c: TrainConfig) -> None:
    _check(1 <= c.rank <= 256, "spec.lora.rank", "must be between 1 and 256")
    _check(0 < c.alpha <= 1024, "spec.lora.alpha", "must be in (0, 1024]")
    _check(0 <= c.dropout < 1, "spec.lora.dropout", "must be in [0, 1)")
    _check(bool(c.target_modules), "spec.lora.target_modules", "must not be empty")
    for i, name in enumerate(c.target_modules):
        _check(bool(name.strip()), f"spec.lora.target_modules[{i}]", "must not be empty")
    for i, name in enumerate(c.text_encoder_target_modules):
        _check(bool(name.strip()), f"spec.lora.text_encoder_target_modules[{i}]", "must not be empty")


def _validate_ti(c: TrainConfig) -> None:
    f = "spec.textual_inversion."
    tok = c.placeholder_token
    _check(bool(tok), f + "placeholder_token", "must not be empty")
    _check(len(tok) <= 64 and not any(ch.isspace() for ch in tok), f + "placeholder_token", "one word, <= 64 chars")
    _check(bool(c.initializer_token), f + "initializer_token", "must not be empty")
    _check(1 <= c.num_vectors <= 64, f + "num_vectors", "must be between 1 and 64")
    _check(tok in c.instance_prompt, "spec.instance_prompt", f"must contain the placeholder {tok!r}")


def _validate_prior(c: TrainConfig) -> None:
    f = "spec.prior_preservation."
    _check(c.method != "TEXTUAL_INVERSION", f + "enabled", "prior preservation applies to DreamBooth and LoRA")
    _check(bool(c.class_prompt.strip()), f + "class_prompt", "must not be empty when enabled")
    _check(0 < c.prior_loss_weight <= 100, f + "weight", "must be in (0, 100]")
    _check(1 <= c.num_class_images <= 1000, f + "num_class_images", "must be between 1 and 1000")


def is_existing_token(tokenizer: Any, text: str) -> bool:
    """True if `text` is a vocabulary entry or a word the tokenizer already maps to one token."""
    if text in tokenizer.get_vocab():
        return True
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def validate_against_tokenizer(config: TrainConfig, tokenizer: Any) -> None:
    """TI checks that need the base model's tokenizer (a transformers tokenizer).

    The placeholder (and its `_1`.. siblings) must be new tokens, and the initializer must
    encode to exactly one token, since its embedding seeds every new vector.
    """
    if config.method != "TEXTUAL_INVERSION":
        return
    f = "spec.textual_inversion."
    for tok in config.trigger_tokens:
        _check(not is_existing_token(tokenizer, tok), f + "placeholder_token", f"{tok!r} is already a token")
    ids = tokenizer.encode(config.initializer_token, add_special_tokens=False)
    _check(len(ids) == 1, f + "initializer_token", f"must be a single token; it encodes to {len(ids)} tokens")
