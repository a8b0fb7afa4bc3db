"""Optimizer / lr-schedule / caption options: proto -> config, dependent defaults, refusals."""

from __future__ import annotations

import pytest

from atelier_api.v1 import training_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training.convert import config_from_proto
from services.training.trainers.config import TrainConfig, validate_config
from tests.unit.test_trainer_config import spec

H = "spec.hyperparameters."


def test_unset_optimizer_is_adamw_and_every_kind_maps_to_its_name() -> None:
    assert config_from_proto(spec("LORA")).optimizer == "adamw"
    kinds = {training_pb2.OPTIMIZER_KIND_ADAMW: "adamw", training_pb2.OPTIMIZER_KIND_ADAMW_8BIT: "adamw_8bit",
             training_pb2.OPTIMIZER_KIND_PRODIGY: "prodigy", training_pb2.OPTIMIZER_KIND_ADAFACTOR: "adafactor"}
    for kind, name in kinds.items():
        assert config_from_proto(spec("LORA", optimizer=kind)).optimizer == name


def test_prodigy_defaults_to_its_unit_rate_unscaled_but_keeps_an_explicit_one() -> None:
    c = config_from_proto(spec("TEXTUAL_INVERSION", optimizer=training_pb2.OPTIMIZER_KIND_PRODIGY))
    assert (c.learning_rate, c.text_encoder_learning_rate, c.scale_lr, c.effective_learning_rate) == (1.0, 1.0,
                                                                                                     False, 1.0)
    c = config_from_proto(spec("LORA", optimizer=training_pb2.OPTIMIZER_KIND_PRODIGY, learning_rate=0.5))
    assert c.learning_rate == 0.5


def test_scheduler_kind_sets_the_name_and_shape_parameters_are_recorded() -> None:
    c = config_from_proto(spec("LORA", lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_COSINE_WITH_RESTARTS,
                                    lr_num_cycles=3, lr_warmup_steps=5))
    assert (c.lr_scheduler, c.lr_num_cycles, c.lr_warmup_steps) == ("cosine_with_restarts", 3, 5)
    dumped = c.model_dump(mode="json")
    assert TrainConfig(**dumped) == c and dumped["optimizer"] == "adamw"
    c = config_from_proto(spec("LORA", lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_POLYNOMIAL, lr_power=2.0))
    assert (c.lr_scheduler, c.lr_power) == ("polynomial", 2.0)


def test_constant_with_warmup_steps_is_recorded_as_constant_with_warmup() -> None:
    c = config_from_proto(spec("LORA", lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_CONSTANT,
                                    lr_warmup_steps=3))
    assert c.lr_scheduler == "constant_with_warmup"
    assert config_from_proto(spec("LORA")).lr_scheduler == "constant"


def test_a_scheduler_kind_that_contradicts_the_string_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        config_from_proto(spec("LORA", lr_scheduler="linear",
                                    lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_COSINE))
    assert err.value.violations[0].field == H + "lr_scheduler_kind"
    agreeing = spec("LORA", lr_scheduler="cosine", lr_scheduler_kind=training_pb2.LR_SCHEDULER_KIND_COSINE)
    assert config_from_proto(agreeing).lr_scheduler == "cosine"


def test_unknown_enum_numbers_are_refused() -> None:
    for field in ("optimizer", "lr_scheduler_kind"):
        with pytest.raises(InvalidInput) as err:
            config_from_proto(spec("LORA", **{field: 99}))
        assert err.value.violations[0].field == H + field


def test_eight_bit_adamw_is_refused_on_a_cpu_deployment_and_accepted_on_cuda() -> None:
    c = config_from_proto(spec("LORA", optimizer=training_pb2.OPTIMIZER_KIND_ADAMW_8BIT))
    with pytest.raises(InvalidInput) as err:
        validate_config(c, Settings(training_device="cpu"))
    assert err.value.violations[0].field == H + "optimizer"
    assert "CUDA" in err.value.violations[0].description and "'cpu'" in err.value.violations[0].description
    validate_config(c, Settings(training_device="cuda:1"))


BAD = [
    ({"lr_num_cycles": 0}, "lr_num_cycles"),
    ({"lr_power": 0.0}, "lr_power"),
    ({"lr_power": 11.0}, "lr_power"),
    ({"lr_scheduler": "polynomial", "learning_rate": 1e-8}, "learning_rate"),
    ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"caption_dropout": -0.1}, "caption_dropout"),
    ({"keep_tokens": 2}, "keep_tokens"),
    ({"keep_tokens": 76, "shuffle_tags": True}, "keep_tokens"),
]


@pytest.mark.parametrize(("hyper", "field"), BAD)
def test_out_of_range_options_name_their_field(hyper: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(spec("LORA", **hyper)), Settings())
    assert err.value.violations[0].field == H + field


def test_caption_dropout_is_refused_for_textual_inversion() -> None:
    with pytest.raises(InvalidInput) as err:
        validate_config(config_from_proto(spec("TEXTUAL_INVERSION", caption_dropout=0.1)), Settings())
    assert err.value.violations[0].field == H + "caption_dropout"


def test_old_stored_configs_without_the_new_fields_load_with_defaults() -> None:
    dumped = config_from_proto(spec("LORA")).model_dump(mode="json")
    for key in ("optimizer", "lr_num_cycles", "lr_power", "caption_dropout", "shuffle_tags", "keep_tokens"):
        dumped.pop(key)
    c = TrainConfig(**dumped)
    assert (c.optimizer, c.caption_dropout, c.shuffle_tags) == ("adamw", 0.0, False)
