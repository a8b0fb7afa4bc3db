"""Textual Inversion without tokenizer churn: reserved embedding slots per text encoder.

Every text encoder gets, once, `n` reserved tokens `<atl_ti_0>` ... `<atl_ti_{n-1}>` in its
tokenizer and `n` extra rows in its input embedding. Loading an adapter version copies its
vectors into free rows; the request's trigger token (say `<concept>`) is rewritten to that
version's slot tokens. So:

* two adapters that both call their token `<concept>` get different slots and never clash,
  and a trigger shared by several adapters of one request expands to all of them, in
  request order (both take effect);
* evicting an adapter only marks its rows free: the tokenizer and the embedding matrix never
  change size after start-up (diffusers' `unload_textual_inversion` rebuilds both and assumes
  a particular tokenizer layout);
* text encoding is bit-identical to diffusers' `load_textual_inversion` with the original token
  name: the same vectors sit behind a different, equally atomic, token id.

A trigger missing from both prompts is appended to the prompt: listing an adapter is a request
to use it. Runs on the device thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from services.common.model_loading import MODEL_LOAD_LOCK

SLOT_TOKEN = "<atl_ti_{}>"
RESERVED_MARK = "atl_ti_"  # prompts containing it (any case) are refused: slots are internal
DEFAULT_SLOTS = 256


class SlotsExhausted(Exception):
    """No room for more textual-inversion vectors in this text encoder."""


@dataclass(frozen=True)
class TiBinding:
    """One loaded TI adapter version in one text encoder: trigger -> its slot tokens."""

    slots: tuple[int, ...]
    triggers: tuple[tuple[str, str], ...]  # (trigger token, replacement text)


class TiSlots:
    """The reserved slots of one (tokenizer, text encoder) pair."""

    def __init__(self, tokenizer: object, text_encoder: torch.nn.Module, count: int = DEFAULT_SLOTS) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        tokens = [SLOT_TOKEN.format(i) for i in range(count)]
        tokenizer.add_tokens(tokens)  # type: ignore[attr-defined]
        self._ids = tokenizer.convert_tokens_to_ids(tokens)  # type: ignore[attr-defined]
        needed = max(self._ids) + 1
        embeddings = text_encoder.get_input_embeddings()  # type: ignore[operator]
        if embeddings.num_embeddings < needed:
            with MODEL_LOAD_LOCK:  # builds a new embedding module: services/common/model_loading.py
                text_encoder.resize_token_embeddings(needed, mean_resizing=False)  # type: ignore[operator]
        with torch.no_grad():
            weight = text_encoder.get_input_embeddings().weight  # type: ignore[operator]
            weight[self._ids] = 0.0
        self._free = list(range(count))

    @property
    def dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().embedding_dim)  # type: ignore[operator]

    @property
    def free(self) -> int:
        return len(self._free)

    def bind(self, vectors: Sequence[tuple[str, torch.Tensor]]) -> TiBinding:
        """Copy each trigger's vectors [n, dim] into free slots; SlotsExhausted when full."""
        needed = sum(int(v.shape[0]) for _t, v in vectors)
        if needed > len(self._free):
            raise SlotsExhausted(f"{needed} textual-inversion vectors needed, {len(self._free)} slots free")
        weight = self.text_encoder.get_input_embeddings().weight  # type: ignore[operator]
        taken: list[int] = []
        triggers: list[tuple[str, str]] = []
        with torch.no_grad():
            for trigger, tensor in vectors:
                mine = [self._free.pop(0) for _ in range(int(tensor.shape[0]))]
                taken.extend(mine)
                for slot, row in zip(mine, tensor, strict=True):
                    weight[self._ids[slot]] = row.to(weight.device, weight.dtype)
                triggers.append((trigger, " ".join(SLOT_TOKEN.format(s) for s in mine)))
        return TiBinding(tuple(taken), tuple(triggers))

    def release(self, binding: TiBinding) -> None:
        """Free the rows (zeroed, so a stale slot token could never reproduce a concept)."""
        weight = self.text_encoder.get_input_embeddings().weight  # type: ignore[operator]
        with torch.no_grad():
            for slot in binding.slots:
                weight[self._ids[slot]].zero_()
        self._free.extend(binding.slots)
        self._free.sort()


def _pattern(trigger: str) -> re.Pattern[str]:
    # A trigger matches as a whole token: not inside a longer word ("cat" in "concatenate").
    return re.compile(rf"(?<![\w]){re.escape(trigger)}(?![\w])")


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: text


def rewrite_prompts(prompt: str, negative: str, bindings: Sequence[TiBinding]) -> tuple[str, str]:
    """Replace each trigger by the slot tokens of every adapter of the request that defines it."""
    replacements: dict[str, list[str]] = {}
    for binding in bindings:
        for trigger, text in binding.triggers:
            replacements.setdefault(trigger, []).append(text)
    for trigger, texts in replacements.items():
        pattern = _pattern(trigger)
        joined = " ".join(texts)
        in_prompt, in_negative = bool(pattern.search(prompt)), bool(pattern.search(negative))
        if not in_prompt and not in_negative:
            prompt = f"{prompt} {joined}".strip()
            continue
        prompt = pattern.sub(_literal(joined), prompt)
        negative = pattern.sub(_literal(joined), negative)
    return prompt, negative
