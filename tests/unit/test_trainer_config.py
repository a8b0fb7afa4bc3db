"""TrainConfig: recipe defaults per method, proto overrides, JSON round trip, validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from atelier_api.v1 import common_pb2, training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training.convert import config_from_proto
from services.training.trainers.config import (
    PRIOR_PRESERVATION_STEPS,
    TrainConfig,
    validate_against_tokenizer,
    validate_config,
)

KIND = {
    "LORA": common_pb2.ADAPTER_KIND_LORA,
    "DREAMBOOTH": common_pb2.ADAPTER_KIND_DREAMBOOTH,
    "TEXTUAL_INVERSION": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
}


def spec(method: str = "LORA", **hyper: object) -> training_pb2.TrainingJobSpec:
    s = training_pb2.TrainingJobSpec(
        method=KIND[method], base_model="tiny", dataset_id="ds1", output_name="out", instance_prompt="a sks dog"
    )
    if method == "TEXTUAL_INVERSION":
        s.instance_prompt = ""
        s.textual_inversion.placeholder_token = "<cat-toy>"
        s.textual_inversion.initializer_token = "toy"
    for key, value in hyper.items():
        setattr(s.hyperparameters, key, value)
    return s


@pytest.mark.parametrize(
    ("method", "lr", "steps", "accum", "effective"),
    [
        ("LORA", 1e-4, 500, 1, 1e-4),
        ("DREAMBOOTH", 5e-6, 400, 1, 5e-6),
        ("TEXTUAL_INVERSION", 5e-4, 3000, 4, 2e-3),  # --scale_lr: 5e-4 * batch 1 * accumulation 4
    ],
)
def test_unset_fields_take_the_methods_recipe_defaults(
    method: str, lr: float, steps: int, accum: int, effective: float
) -> None:
    c = config_from_proto(spec(method), seed=7)
    assert (c.learning_rate, c.max_train_steps, c.gradient_accumulation_steps) == (lr, steps, accum)
    assert c.effective_learning_rate == pytest.approx(effective)
    assert c.lr_scheduler == "constant" and c.lr_warmup_steps == 0
    assert c.resolution is None and c.mixed_precision == "auto" and c.seed == 7
    validate_config(c, Settings())


def test_lora_defaults_follow_the_recipe() -> None:
    c = config_from_proto(spec("LORA"))
    assert (c.rank, c.alpha, c.dropout) == (4, 4.0, 0.0)
    assert c.target_modules == ["to_k", "to_q", "to_v", "to_out.0"]
    assert c.text_encoder_target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]


def test_explicit_values_override_and_an_explicit_lr_is_not_scaled() -> None:
    s = spec("TEXTUAL_INVERSION", learning_rate=1e-3, max_train_steps=10, resolution=64, seed=3)
    s.hyperparameters.mixed_precision = training_pb2.MIXED_PRECISION_BF16
    s.hyperparameters.validation_prompts.append("a <cat-toy>")
    s.textual_inversion.num_vectors = 3
    c = config_from_proto(s)
    assert (c.learning_rate, c.effective_learning_rate, c.max_train_steps, c.resolution) == (1e-3, 1e-3, 10, 64)
    assert (c.seed, c.mixed_precision, c.validation_prompts) == (3, "bf16", ["a <cat-toy>"])
    assert c.instance_prompt == "a photo of a <cat-toy>"
    assert c.trigger_tokens == ["<cat-toy>", "<cat-toy>_1", "<cat-toy>_2"]


def test_lora_alpha_defaults_to_the_given_rank() -> None:
    s = spec("LORA")
    s.lora.rank = 16
    assert config_from_proto(s).alpha == 16.0
    s.lora.alpha = 8
    assert config_from_proto(s).alpha == 8.0


def test_prior_preservation_doubles_default_steps_like_the_recipe() -> None:
    s = spec("DREAMBOOTH")
    s.prior_preservation.enabled = True
    s.prior_preservation.class_prompt = "a dog"
    c = config_from_proto(s)
    assert c.max_train_steps == PRIOR_PRESERVATION_STEPS
    assert (c.prior_loss_weight, c.num_class_images) == (1.0, 100)


def test_unset_seed_is_drawn_once_and_survives_the_json_round_trip() -> None:
    c = config_from_proto(spec("LORA"))
    again = TrainConfig.model_validate_json(c.model_dump_json())
    assert again == c
    assert TrainConfig.model_validate(c.model_dump(mode="json")).seed == c.seed


def test_unspecified_method_is_invalid() -> None:
    s = spec("LORA")
    s.method = common_pb2.ADAPTER_KIND_UNSPECIFIED
    with pytest.raises(InvalidInput) as err:
        config_from_proto(s)
    assert err.value.violations[0].field == "spec.method"


def _lora_rank(s: training_pb2.TrainingJobSpec, value: int) -> None:
    s.lora.rank = value


BAD_VALUES = [
    ({"learning_rate": 0.0}, "spec.hyperparameters.learning_rate"),
    ({"learning_rate": 1.5}, "spec.hyperparameters.learning_rate"),
    ({"max_train_steps": 0}, "spec.hyperparameters.max_train_steps"),
    ({"max_train_steps": 20_001}, "spec.hyperparameters.max_train_steps"),
    ({"train_batch_size": 33}, "spec.hyperparameters.train_batch_size"),
    ({"resolution": 100}, "spec.hyperparameters.resolution"),
    ({"resolution": 2048}, "spec.hyperparameters.resolution"),
    ({"lr_scheduler": "exotic"}, "spec.hyperparameters.lr_scheduler"),
    ({"noise_offset": 2.0}, "spec.hyperparameters.noise_offset"),
    ({"snr_gamma": -1.0}, "spec.hyperparameters.snr_gamma"),
    ({"checkpointing_steps": 0}, "spec.hyperparameters.checkpointing_steps"),
    ({"text_encoder_learning_rate": 0.0}, "spec.hyperparameters.text_encoder_learning_rate"),
]


@pytest.mark.parametrize(("hyper", "field"), BAD_VALUES)
def test_out_of_range_hyperparameters_name_their_field(hyper: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(spec("LORA", **hyper)), Settings())
    assert err.value.violations[0].field == field


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: _lora_rank(s, 0), "spec.lora.rank"),
        (lambda s: _lora_rank(s, 257), "spec.lora.rank"),
        (lambda s: setattr(s, "instance_prompt", "  "), "spec.instance_prompt"),
        (lambda s: setattr(s, "base_model", ""), "spec.base_model"),
        (lambda s: setattr(s.prior_preservation, "enabled", True), "spec.prior_preservation.class_prompt"),
        (lambda s: s.lora.target_modules.append(""), "spec.lora.target_modules[4]"),
    ],
)
def test_other_bad_fields_are_named(mutate: object, field: str) -> None:
    s = spec("LORA")
    s.lora.target_modules.extend(["to_q", "to_k", "to_v", "to_out.0"])
    mutate(s)  # type: ignore[operator]
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(s), Settings())
    assert err.value.violations[0].field == field


def test_settings_bound_the_limits() -> None:
    c = config_from_proto(spec("LORA", max_train_steps=600))
    with pytest.raises(InvalidInput):
        validate_config(c, Settings(max_train_steps=500))


def test_textual_inversion_fields_are_checked() -> None:
    s = spec("TEXTUAL_INVERSION")
    s.textual_inversion.placeholder_token = ""
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(s), Settings())
    assert err.value.violations[0].field == "spec.textual_inversion.placeholder_token"
    s = spec("TEXTUAL_INVERSION")
    s.instance_prompt = "a photo of a toy"  # no placeholder
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(s), Settings())
    assert err.value.violations[0].field == "spec.instance_prompt"
    s = spec("TEXTUAL_INVERSION", train_text_encoder=True)
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(s), Settings())
    assert err.value.violations[0].field == "spec.hyperparameters.train_text_encoder"


def test_tokenizer_checks_reject_existing_placeholders_and_multi_token_initializers(
    tiny_random_pipeline_dir: Path,
) -> None:
    tok = CLIPTokenizer.from_pretrained(tiny_random_pipeline_dir / "tokenizer")
    good = config_from_proto(spec("TEXTUAL_INVERSION"))
    validate_against_tokenizer(good, tok)
    existing = good.model_copy(update={"placeholder_token": "dog", "instance_prompt": "a dog"})
    with pytest.raises(InvalidInput) as err:
        validate_against_tokenizer(existing, tok)
    assert err.value.violations[0].field == "spec.textual_inversion.placeholder_token"
    multi = good.model_copy(update={"initializer_token": "toy dog"})
    with pytest.raises(InvalidInput) as err:
        validate_against_tokenizer(multi, tok)
    assert err.value.violations[0].field == "spec.textual_inversion.initializer_token"
