"""Textual Inversion without tokenizer churn: reserved embedding slots per text encoder.

Every text encoder the family trains TI for (services.families `ti_slots`: SD 1.x's one, SDXL's
CLIP-L and CLIP-G, Flux's CLIP-L) gets, once, `n` reserved tokens `<atl_ti_0>` ... `<atl_ti_{n-1}>` in its
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
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.common.model_loading import MODEL_LOAD_LOCK

SLOT_TOKEN = "<atl_ti_{}>"
RESERVED_MARK = "atl_ti_"  # prompts containing it (any case) are refused: slots are internal
DEFAULT_SLOTS = 256


class SlotsExhausted(Exception):
    """No room for more textual-inversion vectors in these text encoders."""


@dataclass(frozen=True)
class TiEncoder:
    """One text encoder that takes TI vectors: its key in a TI file, tokenizer and module."""

    key: str  # "clip_l", "clip_g", "emb_params" (services.families TextEncoderSlot.ti_key)
    tokenizer: object
    text_encoder: torch.nn.Module


@dataclass(frozen=True)
class TiBinding:
    """One loaded TI adapter version in one text encoder: trigger -> its slot tokens."""

    slots: tuple[int, ...]
    triggers: tuple[tuple[str, str], ...]  # (trigger token, replacement text)


Vectors = dict[str, torch.Tensor]
"""One trigger's vectors [n, dim] per TI-file key ("clip_l", ...; "" = a single-tensor file)."""


class _Rows:
    """The reserved rows of one (tokenizer, text encoder) pair."""

    def __init__(self, encoder: TiEncoder, count: int) -> None:
        self.encoder = encoder
        tokens = [SLOT_TOKEN.format(i) for i in range(count)]
        encoder.tokenizer.add_tokens(tokens)  # type: ignore[attr-defined]
        self.ids = encoder.tokenizer.convert_tokens_to_ids(tokens)  # type: ignore[attr-defined]
        needed = max(self.ids) + 1
        module: Any = encoder.text_encoder
        if module.get_input_embeddings().num_embeddings < needed:
            with MODEL_LOAD_LOCK:  # builds a new embedding module: services/common/model_loading.py
                module.resize_token_embeddings(needed, mean_resizing=False)
        with torch.no_grad():
            self.weight[self.ids] = 0.0

    @property
    def weight(self) -> torch.Tensor:
        return self.encoder.text_encoder.get_input_embeddings().weight  # type: ignore[operator, no-any-return]

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])


class TiSlots:
    """The reserved slots of a family's TI text encoders (SD 1.x: one; SDXL: CLIP-L and CLIP-G).

    Slots are taken in lockstep: slot i is row `<atl_ti_i>` in every encoder, so one rewritten
    prompt carries a concept into each encoder, each with its own vectors (as diffusers'
    `load_textual_inversion` called once per encoder with the same token).
    """

    def __init__(self, encoders: Sequence[TiEncoder], count: int = DEFAULT_SLOTS) -> None:
        if not encoders:
            raise ValueError("TiSlots needs at least one text encoder")
        self._rows = [_Rows(encoder, count) for encoder in encoders]
        self._free = list(range(count))

    @property
    def encoders(self) -> tuple[TiEncoder, ...]:
        return tuple(rows.encoder for rows in self._rows)

    @property
    def dim(self) -> int:
        """The first encoder's embedding width."""
        return self._rows[0].dim

    @property
    def free(self) -> int:
        return len(self._free)

    def vectors_for(self, trigger: str, vectors: Vectors) -> list[torch.Tensor]:
        """Each encoder's [n, dim] for one trigger, or FailedPrecondition saying what is missing.

        A single-tensor file ("" key) fits a one-encoder family's encoder, and only the first
        encoder of several: SDXL needs its `clip_l` and `clip_g` vectors by name.
        """
        out = []
        for i, rows in enumerate(self._rows):
            key = rows.encoder.key
            tensor = vectors.get(key)
            if tensor is None and i == 0:
                tensor = vectors.get("")
            if tensor is None and len(self._rows) == 1 and len(vectors) == 1:
                tensor = next(iter(vectors.values()))  # one encoder, one tensor: whatever its key
            if tensor is None:
                need = " and ".join(repr(r.encoder.key) for r in self._rows)
                raise FailedPrecondition(
                    f"textual inversion {trigger!r}: this base model needs vectors for {need}, the file has "
                    f"{sorted(k or '(one unnamed tensor)' for k in vectors)}", field_name="spec.adapters")
            if tensor.shape[-1] != rows.dim:
                raise FailedPrecondition(
                    f"textual inversion {trigger!r}: {key or 'embedding'} has dim {tensor.shape[-1]}, the text "
                    f"encoder {rows.dim}", field_name="spec.adapters")
            out.append(tensor)
        if len({int(t.shape[0]) for t in out}) != 1:
            raise FailedPrecondition(f"textual inversion {trigger!r}: the encoders' vector counts differ",
                                     field_name="spec.adapters")
        return out

    def needed(self, entries: Sequence[tuple[str, Vectors]]) -> int:
        return sum(int(self.vectors_for(t, v)[0].shape[0]) for t, v in entries)

    def bind(self, entries: Sequence[tuple[str, Vectors]]) -> TiBinding:
        """Copy each trigger's vectors into free slots of every encoder; SlotsExhausted when full."""
        per_trigger = [(trigger, self.vectors_for(trigger, vectors)) for trigger, vectors in entries]
        needed = sum(int(tensors[0].shape[0]) for _t, tensors in per_trigger)
        if needed > len(self._free):
            raise SlotsExhausted(f"{needed} textual-inversion vectors needed, {len(self._free)} slots free")
        taken: list[int] = []
        triggers: list[tuple[str, str]] = []
        with torch.no_grad():
            for trigger, tensors in per_trigger:
                mine = [self._free.pop(0) for _ in range(int(tensors[0].shape[0]))]
                taken.extend(mine)
                for rows, tensor in zip(self._rows, tensors, strict=True):
                    weight = rows.weight
                    for slot, row in zip(mine, tensor, strict=True):
                        weight[rows.ids[slot]] = row.to(weight.device, weight.dtype)
                triggers.append((trigger, " ".join(SLOT_TOKEN.format(s) for s in mine)))
        return TiBinding(tuple(taken), tuple(triggers))

    def release(self, binding: TiBinding) -> None:
        """Free the rows (zeroed, so a stale slot token could never reproduce a concept)."""
        with torch.no_grad():
            for rows in self._rows:
                weight = rows.weight
                for slot in binding.slots:
                    weight[rows.ids[slot]].zero_()
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
