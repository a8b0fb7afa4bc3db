"""Request validation defaults and limits, and textual-inversion prompt rewriting."""

from __future__ import annotations

import pytest

from atelier_api.v1 import common_pb2, inference_pb2
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.inference.textual_inversion import TiBinding, rewrite_prompts
from services.inference.validation import DEFAULT_STEPS, parse_spec
from services.registry.refs import AdapterRef


def test_defaults_fill_unset_fields() -> None:
    request = parse_spec(inference_pb2.GenerationSpec(base_model="tiny", prompt="a box"), Settings(), "t")
    assert (request.num_images, request.steps, request.guidance_scale) == (1, DEFAULT_STEPS, 0.0)  # family default
    assert (request.width, request.height, request.scheduler) == (0, 0, "default")
    assert 0 <= request.seed < 2**64


def test_refs_versions_aliases_and_weights() -> None:
    spec = inference_pb2.GenerationSpec(base_model="tiny", prompt="p", seed=0, adapters=[
        inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name="a", version=3), weight=-2.0),
        inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name="b", alias="prod"), weight=0.5),
        inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name="c"), weight=2.0),
    ])
    request = parse_spec(spec, Settings(), "t")
    assert [(a.ref, a.weight) for a in request.adapters] == [
        (AdapterRef("t", "a", version=3), -2.0), (AdapterRef("t", "b", alias="prod"), 0.5), (AdapterRef("t", "c"), 2.0)]
    assert request.seed == 0


@pytest.mark.parametrize(("alias", "version"), [("latest", None), ("", 0)])
def test_reserved_alias_and_version_zero_are_refused(alias: str, version: int | None) -> None:
    ref = common_pb2.AdapterRef(name="a", alias=alias) if alias else common_pb2.AdapterRef(name="a", version=0)
    spec = inference_pb2.GenerationSpec(base_model="tiny", prompt="p",
                                        adapters=[inference_pb2.AdapterWeight(ref=ref, weight=1.0)])
    with pytest.raises(InvalidInput) as exc:
        parse_spec(spec, Settings(), "t")
    assert exc.value.violations[0].field in ("spec.adapters[0].ref.alias", "spec.adapters[0].ref.version")


def test_nan_weight_is_refused() -> None:
    spec = inference_pb2.GenerationSpec(base_model="tiny", prompt="p", adapters=[
        inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name="a"), weight=float("nan"))])
    with pytest.raises(InvalidInput) as exc:
        parse_spec(spec, Settings(), "t")
    assert exc.value.violations[0].field == "spec.adapters[0].weight"


def binding(trigger: str, *slots: int) -> TiBinding:
    return TiBinding(tuple(slots), ((trigger, " ".join(f"<atl_ti_{s}>" for s in slots)),))


def test_trigger_is_replaced_by_its_slots_everywhere_it_appears() -> None:
    prompt, negative = rewrite_prompts("a <cat-toy> and a <cat-toy>", "blurry <cat-toy>", [binding("<cat-toy>", 0, 1)])
    assert prompt == "a <atl_ti_0> <atl_ti_1> and a <atl_ti_0> <atl_ti_1>"
    assert negative == "blurry <atl_ti_0> <atl_ti_1>"


def test_shared_trigger_expands_to_every_adapter_in_request_order() -> None:
    prompt, _ = rewrite_prompts("a photo of <concept>", "", [binding("<concept>", 4), binding("<concept>", 7)])
    assert prompt == "a photo of <atl_ti_4> <atl_ti_7>"


def test_missing_trigger_is_appended_and_words_are_not_split() -> None:
    prompt, _ = rewrite_prompts("concatenate", "", [binding("cat", 2)])
    assert prompt == "concatenate <atl_ti_2>"
    prompt, negative = rewrite_prompts("a dog", "ugly", [binding("ugly", 3)])
    assert (prompt, negative) == ("a dog", "<atl_ti_3>")  # used as a negative embedding
