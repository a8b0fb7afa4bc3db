"""The prompt each training sample sees: instance prompt, caption template, shuffling, dropout.

Rules (docs/architecture.md, Trainers, "Captions"):
- an instance prompt without `{caption}` keeps the original meaning: an image's caption
  replaces it, an image without one uses it;
- an instance prompt with `{caption}` is a template: every `{caption}` is replaced by the
  image's caption (an empty caption also drops the separator next to it, so
  "a photo of sks dog, {caption}" becomes "a photo of sks dog");
- `shuffle_tags` reorders the comma-separated tags of the caption part (the filled-in caption
  with a template, else the whole prompt) every step, leaving the first `keep_tokens` tags in
  place (kohya's keep_tokens);
- `caption_dropout` trains that share of samples on the empty prompt (the unconditional
  embedding), after templating, as kohya and diffusers' proportion_empty_prompts do.
Per-step randomness comes from its own stream keyed by (seed, step, micro-batch), so it is
reproducible, survives resume, and leaves every other draw of a run unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CAPTION_FIELD = "{caption}"
CAPTION_STREAM = 0xCA97  # step_rng stream id, distinct from the batch stream (0)
_SLOT_WITH_COMMA = re.compile(r"\s*,\s*\{caption\}|\{caption\}\s*,\s*")


def fill_template(template: str, caption: str) -> str:
    """`template` with every `{caption}` replaced (and tidied when the caption is empty)."""
    if caption:
        return template.replace(CAPTION_FIELD, caption)
    text = _SLOT_WITH_COMMA.sub("", template).replace(CAPTION_FIELD, "")
    return " ".join(text.split()).strip(" ,")


def shuffle_tags(text: str, keep_tokens: int, rng: np.random.Generator) -> str:
    """Shuffle the comma-separated tags of `text`; the first `keep_tokens` stay first."""
    tags = [t.strip() for t in text.split(",") if t.strip()]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = rng.permutation(len(rest)) if len(rest) > 1 else range(len(rest))
    return ", ".join(fixed + [rest[i] for i in order])


def _identity(text: str) -> str:
    return text


@dataclass(frozen=True)
class CaptionBuilder:
    """Builds training prompts from the instance prompt and the dataset's captions."""

    instance_prompt: str
    captions: list[str]  # per image; "" means none
    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 0
    rewrite: Callable[[str], str] = _identity  # the method's prompt rewrite (TI vector tokens)

    @property
    def is_template(self) -> bool:
        return CAPTION_FIELD in self.instance_prompt

    @property
    def varies(self) -> bool:
        """True when a sample's prompt can change from step to step."""
        return self.dropout > 0 or self.shuffle

    @property
    def open_ended(self) -> bool:
        """True when the variants are too many to cache (shuffled orders)."""
        return self.shuffle

    def _caption_part(self, index: int) -> str:
        caption = self.captions[index]
        return caption if self.is_template else (caption or self.instance_prompt)

    def _compose(self, part: str) -> str:
        return fill_template(self.instance_prompt, part) if self.is_template else part

    def base(self, index: int) -> str:
        """The un-augmented prompt of image `index` (cached, and used for the eval loss)."""
        return self.rewrite(self._compose(self._caption_part(index)))

    def bases(self) -> list[str]:
        return [self.base(i) for i in range(len(self.captions))]

    def variants(self) -> list[str]:
        """Every prompt a step can draw when the set is closed (the bases, plus "" with dropout)."""
        return self.bases() + ([self.rewrite("")] if self.dropout > 0 else [])

    def for_sample(self, index: int, rng: np.random.Generator) -> str:
        """The prompt of one sample of image `index`, drawing from `rng` (a fixed count of draws)."""
        part = self._caption_part(index)
        if self.shuffle:
            part = shuffle_tags(part, self.keep_tokens, rng)
        drop = bool(rng.random() < self.dropout) if self.dropout > 0 else False
        return self.rewrite("" if drop else self._compose(part))

    def for_batch(self, indices: list[int], rng: np.random.Generator) -> list[str]:
        if not self.varies:
            return [self.base(i) for i in indices]
        return [self.for_sample(i, rng) for i in indices]
