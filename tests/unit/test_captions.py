"""The caption builder: templates, seeded tag shuffling with kept prefixes, dropout."""

from __future__ import annotations

import numpy as np

from services.training.trainers.captions import CaptionBuilder, fill_template, shuffle_tags
from services.training.trainers.data import step_rng


def test_an_instance_prompt_without_the_field_is_replaced_by_captions_as_before() -> None:
    b = CaptionBuilder("a photo of sks dog", ["a dog on grass", ""])
    assert b.bases() == ["a dog on grass", "a photo of sks dog"]
    assert not b.is_template and not b.varies


def test_a_template_wraps_each_caption_and_tidies_an_empty_one() -> None:
    b = CaptionBuilder("a photo of sks dog, {caption}", ["on grass, sunny", ""])
    assert b.bases() == ["a photo of sks dog, on grass, sunny", "a photo of sks dog"]
    assert fill_template("{caption}, in the style of sks", "") == "in the style of sks"
    assert fill_template("a {caption} sks dog", "") == "a sks dog"
    assert fill_template("x, {caption}, y", "") == "x, y"
    assert fill_template("{caption} by sks and {caption}", "red") == "red by sks and red"


def test_shuffling_keeps_the_first_tags_and_permutes_the_rest_reproducibly() -> None:
    text = "sks dog, red, round, shiny, small, outdoors"
    orders = {shuffle_tags(text, 2, np.random.default_rng(s)) for s in range(30)}
    assert len(orders) > 5
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == ["sks dog", "red"] and sorted(tags) == sorted(text.split(", "))
    assert shuffle_tags(text, 2, np.random.default_rng(4)) == shuffle_tags(text, 2, np.random.default_rng(4))
    assert shuffle_tags("one", 0, np.random.default_rng(0)) == "one"
    assert shuffle_tags("a,  b ,c", 5, np.random.default_rng(0)) == "a, b, c"


def test_with_a_template_only_the_caption_part_is_shuffled() -> None:
    b = CaptionBuilder("a photo of sks dog, {caption}", ["red, round, shiny"], shuffle=True)
    prompts = {b.for_sample(0, np.random.default_rng(s)) for s in range(20)}
    assert len(prompts) > 1
    assert all(p.startswith("a photo of sks dog, ") for p in prompts)
    assert b.open_ended and b.base(0) == "a photo of sks dog, red, round, shiny"


def test_dropout_gives_the_empty_prompt_at_about_its_rate_and_is_seeded() -> None:
    b = CaptionBuilder("a photo of sks dog", ["", "a dog"], dropout=0.25)
    draws = [b.for_batch([0, 1], step_rng(7, step, 0, 1)) for step in range(400)]
    empty = sum(p == "" for batch in draws for p in batch) / 800
    assert 0.18 < empty < 0.32
    assert set(b.variants()) == {"a photo of sks dog", "a dog", ""} and not b.open_ended
    again = [b.for_batch([0, 1], step_rng(7, step, 0, 1)) for step in range(400)]
    assert again == draws


def test_the_method_rewrite_applies_after_templating() -> None:
    b = CaptionBuilder("a photo of <t>, {caption}", ["red"], rewrite=lambda s: s.replace("<t>", "<t> <t>_1"))
    assert b.base(0) == "a photo of <t> <t>_1, red"
    no_options = CaptionBuilder("p", ["", "c"])
    assert no_options.for_batch([1, 0], np.random.default_rng(0)) == ["c", "p"]
