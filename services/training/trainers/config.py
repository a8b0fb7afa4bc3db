"""The training configuration: one pydantic model, filled from the caller's values with recipe defaults.

The proto is read at the edge (`services.training.convert.config_from_proto`), which hands
`TrainConfig.resolve` the fields the caller set. Every optional field of `TrainingJobSpec`
that the caller leaves unset takes the value the
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

from services.common.config import Settings
from services.common.errors import FailedPrecondition, Violations
from services.families import OBJECTIVE_DIFFUSION, by_name
from services.training.trainers.choices import Optimizer, resolve_choices, validate_choices

Method = Literal["LORA", "DREAMBOOTH", "TEXTUAL_INVERSION"]
Precision = Literal["auto", "no", "fp16", "bf16"]

LR_SCHEDULERS = frozenset(
    {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"}
)

PUBLISH_CHOICES = ("last", "best")

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
    use_dora: bool = False  # peft DoRA: a magnitude vector per adapted layer
    conv_rank: int = 0  # > 0: LoCon, the UNet's resnet/sampler Conv2d layers at this rank too
    conv_alpha: float | None = Field(None, description="None: conv_rank.")
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
    # held-out validation loss every validation_steps (heldout.py), the overfit alarm, publish=best
    heldout_validation: bool = False
    overfit_patience: int = 3  # 0: no alarm
    stop_on_overfit: bool = False
    publish: str = "last"  # "last" or "best" (the lowest held-out validation loss)
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
    def resolve(
        cls, method: Method, fields: dict[str, Any], hyper: dict[str, Any], seed: int | None = None
    ) -> TrainConfig:
        """Resolve the caller's values: unset optional fields take the method's recipe default.

        `fields` are the spec's values outside the hyper-parameters (optional ones only when
        set); `hyper` the hyper-parameters the caller set. An unset seed is drawn here (or
        taken from `seed`) and recorded, so every attempt of the job, including a resumed
        one, uses the same seed.
        """
        values: dict[str, Any] = {**RECIPE_DEFAULTS[method], **fields, "method": method}
        if values.get("with_prior_preservation") and "max_train_steps" not in hyper:
            values["max_train_steps"] = PRIOR_PRESERVATION_STEPS
        if method == "TEXTUAL_INVERSION" and not values.get("instance_prompt") and values.get("placeholder_token"):
            values["instance_prompt"] = f"a photo of a {values['placeholder_token']}"
        values.setdefault("alpha", float(values.get("rank", 4)))  # the recipe's alpha is the rank
        if values.get("conv_rank") and values.get("conv_alpha") is None:
            values["conv_alpha"] = float(values["conv_rank"])  # likewise for the conv layers
        if "learning_rate" in hyper:
            values["scale_lr"] = False  # an explicit rate is used as given
        values.update(hyper)
        if values.get("publish") == "best" or hyper.get("overfit_patience") or hyper.get("stop_on_overfit"):
            values.setdefault("heldout_validation", True)  # judged by the held-out loss: asking for them turns it on
        resolve_choices(values, hyper)
        if "seed" not in values:
            values["seed"] = seed if seed is not None else secrets.randbelow(2**31)
        return cls(**values)


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ... : the diffusers TI recipe's multi-vector token names."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


_H = "spec.hyperparameters."


def validate_config(config: TrainConfig, settings: Settings, errors: Violations | None = None) -> None:
    """Check every value; each out-of-range one is a violation naming its proto field.

    With `errors`, the violations are added to it (the caller raises once for the whole
    request); without, one InvalidInput listing all of them is raised here. Checks that need
    the base model's tokenizer live in `validate_against_tokenizer`.
    """
    e = Violations() if errors is None else errors
    e.check(bool(config.base_model), "spec.base_model", "must not be empty")
    e.check(bool(config.dataset_id), "spec.dataset_id", "must not be empty")
    e.check(bool(config.output_name), "spec.output_name", "must not be empty")
    _validate_hyper(config, settings, e)
    validate_choices(config, settings, e)
    if config.method == "LORA":
        _validate_lora(config, e)
    if config.method == "TEXTUAL_INVERSION":
        _validate_ti(config, e)
    _validate_prompts(config, e)
    if config.with_prior_preservation:
        _validate_prior(config, e)
    if errors is None:
        e.raise_if_any()


def _validate_hyper(c: TrainConfig, s: Settings, e: Violations) -> None:
    e.check(0 < c.learning_rate <= 1, _H + "learning_rate", "must be in (0, 1]")
    e.check(0 < c.text_encoder_learning_rate <= 1, _H + "text_encoder_learning_rate", "must be in (0, 1]")
    e.check(
        1 <= c.max_train_steps <= s.max_train_steps,
        _H + "max_train_steps",
        f"must be between 1 and {s.max_train_steps}",
    )
    e.check(
        1 <= c.train_batch_size <= s.max_train_batch_size,
        _H + "train_batch_size",
        f"must be between 1 and {s.max_train_batch_size}",
    )
    if c.resolution is not None:
        e.check(
            16 <= c.resolution <= s.max_train_resolution and c.resolution % 8 == 0,
            _H + "resolution",
            f"must be a multiple of 8 between 16 and {s.max_train_resolution}",
        )
    e.check(1 <= c.gradient_accumulation_steps <= 128, _H + "gradient_accumulation_steps", "must be 1..128")
    e.check(c.lr_scheduler in LR_SCHEDULERS, _H + "lr_scheduler", f"must be one of {sorted(LR_SCHEDULERS)}")
    e.check(0 <= c.lr_warmup_steps <= c.max_train_steps, _H + "lr_warmup_steps", "must be 0..max_train_steps")
    e.check(0 <= c.seed < 2**63, _H + "seed", "must be below 2**63")
    e.check(0 <= c.snr_gamma <= 100, _H + "snr_gamma", "must be 0 (off) .. 100")
    e.check(0 <= c.noise_offset <= 1, _H + "noise_offset", "must be in [0, 1]")
    e.check(c.checkpointing_steps >= 1, _H + "checkpointing_steps", "must be at least 1")
    e.check(c.validation_steps >= 1, _H + "validation_steps", "must be at least 1")
    e.check(len(c.validation_prompts) <= 8, _H + "validation_prompts", "at most 8 prompts")
    for i, prompt in enumerate(c.validation_prompts):
        e.check(0 < len(prompt) <= 1000, f"{_H}validation_prompts[{i}]", "must be 1..1000 characters")
    _validate_heldout(c, e)
    e.check(0 <= c.max_grad_norm <= 1e4, _H + "max_grad_norm", "must be 0 (off) .. 1e4")
    e.check(0 <= c.adam_weight_decay <= 1, _H + "adam_weight_decay", "must be in [0, 1]")
    e.check(
        not (c.train_text_encoder and c.method == "TEXTUAL_INVERSION"),
        _H + "train_text_encoder",
        "textual inversion trains only the new embeddings",
    )


def _validate_heldout(c: TrainConfig, e: Violations) -> None:
    e.check(c.publish in PUBLISH_CHOICES, _H + "publish", f"must be one of {list(PUBLISH_CHOICES)}")
    if c.publish == "best":
        e.check(c.heldout_validation, _H + "publish", "best needs heldout_validation (leave it unset or true)")
    e.check(0 <= c.overfit_patience <= 1000, _H + "overfit_patience", "must be 0 (off) .. 1000")
    if c.stop_on_overfit:
        e.check(c.heldout_validation and c.overfit_patience > 0, _H + "stop_on_overfit",
                "needs heldout_validation and overfit_patience > 0")


def _validate_prompts(c: TrainConfig, e: Violations) -> None:
    e.check(bool(c.instance_prompt.strip()), "spec.instance_prompt", "must not be empty")
    e.check(len(c.instance_prompt) <= 1000, "spec.instance_prompt", "at most 1000 characters")


def _validate_lora(c: TrainConfig, e: Violations) -> None:
    rank_ok = 1 <= c.rank <= 256
    e.check(rank_ok, "spec.lora.rank", "must be between 1 and 256")
    if rank_ok or c.alpha != c.rank:  # an unset alpha is the rank: a bad rank is reported alone
        e.check(0 < c.alpha <= 1024, "spec.lora.alpha", "must be in (0, 1024]")
    e.check(0 <= c.dropout < 1, "spec.lora.dropout", "must be in [0, 1)")
    e.check(bool(c.target_modules), "spec.lora.target_modules", "must not be empty")
    e.check(0 <= c.conv_rank <= 256, "spec.lora.conv_rank", "must be between 0 (no conv LoRA) and 256")
    if c.conv_alpha is not None:
        e.check(c.conv_rank > 0, "spec.lora.conv_alpha", "needs spec.lora.conv_rank > 0")
        e.check(0 < c.conv_alpha <= 1024, "spec.lora.conv_alpha", "must be in (0, 1024]")
    for i, name in enumerate(c.target_modules):
        e.check(bool(name.strip()), f"spec.lora.target_modules[{i}]", "must not be empty")
    for i, name in enumerate(c.text_encoder_target_modules):
        e.check(bool(name.strip()), f"spec.lora.text_encoder_target_modules[{i}]", "must not be empty")


def _validate_ti(c: TrainConfig, e: Violations) -> None:
    f = "spec.textual_inversion."
    tok = c.placeholder_token
    e.check(bool(tok), f + "placeholder_token", "must not be empty")
    e.check(len(tok) <= 64 and not any(ch.isspace() for ch in tok), f + "placeholder_token", "one word, <= 64 chars")
    e.check(bool(c.initializer_token), f + "initializer_token", "must not be empty")
    e.check(1 <= c.num_vectors <= 64, f + "num_vectors", "must be between 1 and 64")
    e.check(tok in c.instance_prompt, "spec.instance_prompt", f"must contain the placeholder {tok!r}")


def _validate_prior(c: TrainConfig, e: Violations) -> None:
    f = "spec.prior_preservation."
    e.check(c.method != "TEXTUAL_INVERSION", f + "enabled", "prior preservation applies to DreamBooth and LoRA")
    e.check(bool(c.class_prompt.strip()), f + "class_prompt", "must not be empty when enabled")
    e.check(0 < c.prior_loss_weight <= 100, f + "weight", "must be in (0, 100]")
    e.check(1 <= c.num_class_images <= 1000, f + "num_class_images", "must be between 1 and 1000")


def is_existing_token(tokenizer: Any, text: str) -> bool:
    """True if `text` is a vocabulary entry or a word the tokenizer already maps to one token."""
    if text in tokenizer.get_vocab():
        return True
    ids = tokenizer.encode(text, add_special_tokens=False)
    return len(ids) == 1 and ids[0] != tokenizer.unk_token_id


def validate_against_family(config: TrainConfig, family_name: str) -> None:
    """Options the base model's family cannot honour: FailedPrecondition naming the field.

    `family_name` is the base manifest's `family` ("" for a base imported before families
    were recorded: nothing to check here; the worker checks the loaded pipeline again).
    """
    if not family_name:
        return
    family = by_name(family_name)
    if config.snr_gamma > 0 and family.objective != OBJECTIVE_DIFFUSION:
        raise FailedPrecondition(
            f"min-SNR weighting (snr_gamma) applies to DDPM noise objectives; {family.title} trains with "
            f"{family.objective}: leave snr_gamma at 0", _H + "snr_gamma")
    if config.method == "TEXTUAL_INVERSION" and not family.ti_slots:
        raise FailedPrecondition(f"{family.title} has no text encoder textual inversion can train", "spec.method")
    if config.method == "LORA" and config.conv_rank and family.denoiser != "unet":
        raise FailedPrecondition(f"conv LoRA adapts a UNet's Conv2d layers; the {family.title} {family.denoiser} "
                                 "has none: leave conv_rank unset", "spec.lora.conv_rank")


def validate_against_tokenizer(config: TrainConfig, tokenizer: Any) -> None:
    """TI checks that need the base model's tokenizer (a transformers tokenizer).

    The placeholder (and its `_1`.. siblings) must be new tokens, and the initializer must
    encode to exactly one token, since its embedding seeds every new vector.
    """
    if config.method != "TEXTUAL_INVERSION":
        return
    f = "spec.textual_inversion."
    errors = Violations()
    for tok in config.trigger_tokens:
        errors.check(not is_existing_token(tokenizer, tok), f + "placeholder_token", f"{tok!r} is already a token")
    ids = tokenizer.encode(config.initializer_token, add_special_tokens=False)
    errors.check(len(ids) == 1, f + "initializer_token", f"must be a single token; it encodes to {len(ids)} tokens")
    errors.raise_if_any()
