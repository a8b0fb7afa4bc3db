"""SDK cores without a server: adapter refs, routing header, request building, backoff."""

from __future__ import annotations

import random

import pytest

from atelier.refs import format_ref, parse_ref, parse_weighted, routing_value, to_adapter_weights
from atelier.requests import TrainArgs, generation_spec, training_request
from atelier.retry import RetryPolicy
from atelier_api.v1 import common_pb2, training_pb2


@pytest.mark.parametrize(
    ("text", "selector", "value"),
    [("dog", None, None), ("dog@3", "version", 3), ("dog:prod", "alias", "prod")],
)
def test_parse_ref_forms(text: str, selector: str | None, value: object) -> None:
    ref = parse_ref(text)
    assert ref.name == "dog"
    assert ref.WhichOneof("selector") == selector
    if selector:
        assert getattr(ref, selector) == value
    assert format_ref(ref) == text


def test_parse_ref_rejects_non_numeric_version() -> None:
    with pytest.raises(ValueError, match="version"):
        parse_ref("dog@latest")


def test_weighted_refs_and_routing_header_is_order_independent() -> None:
    assert parse_weighted("style@3=0.5").weight == pytest.approx(0.5)
    assert parse_weighted("style").weight == 1.0
    first = to_adapter_weights(["b:prod=0.2", ("a@1", 0.7)])
    second = to_adapter_weights([("a@1", 0.7), "b:prod=0.2"])
    assert routing_value(first) == routing_value(second) == "a@1,b:prod"


def test_training_request_maps_options_and_refuses_unknown_ones() -> None:
    args = TrainArgs(method="lora", base_model="tiny-sd", dataset="ds1", name="dog", instance_prompt="a sks dog",
                     extra={"rank": 8, "learning_rate": 2e-4, "max_train_steps": 10, "mixed_precision": "bf16",
                            "validation_prompts": ["a sks dog"]})
    request = training_request(args, "req-1")
    spec = request.spec
    assert request.request_id == "req-1"
    assert spec.method == common_pb2.ADAPTER_KIND_LORA
    assert spec.lora.rank == 8
    assert spec.hyperparameters.learning_rate == pytest.approx(2e-4)
    assert spec.hyperparameters.HasField("max_train_steps")
    assert not spec.hyperparameters.HasField("train_batch_size")
    assert spec.hyperparameters.mixed_precision == training_pb2.MIXED_PRECISION_BF16
    assert list(spec.hyperparameters.validation_prompts) == ["a sks dog"]
    with pytest.raises(TypeError, match="unknown training option"):
        training_request(TrainArgs(method="lora", base_model="b", dataset="d", name="n", extra={"rnak": 4}), None)
    assert training_request(args, None).request_id  # a fresh idempotency key is generated


def test_generation_spec_keeps_seed_presence() -> None:
    assert not generation_spec("p", base_model="b").HasField("seed")
    assert generation_spec("p", base_model="b", seed=0).HasField("seed")


def test_backoff_grows_with_jitter_and_honours_server_hint() -> None:
    policy = RetryPolicy(initial_backoff_seconds=0.1, multiplier=2.0, max_backoff_seconds=1.0, jitter=0.5,
                         rng=random.Random(7))
    delays = [policy.delay(attempt, None) for attempt in range(1, 8)]
    for attempt, delay in enumerate(delays, start=1):
        base = min(1.0, 0.1 * 2 ** (attempt - 1))
        assert base * 0.5 <= delay <= base * 1.5
    assert 3.0 <= policy.delay(1, 3.0) <= 3.0 * 1.25  # the server's delay, jittered upwards only
    assert 0.25 <= policy.delay(1, None, floor=0.25) <= 0.25 * 1.25
