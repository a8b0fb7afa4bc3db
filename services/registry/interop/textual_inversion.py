"""Textual-inversion embeddings: diffusers <-> A1111, for every family with TI.

The family says which text encoders take embeddings (`ModelFamily.ti_slots`): SD1.x/2.x its
one CLIP, SDXL both (file keys clip_l/clip_g), Flux CLIP-L only (a single-tensor file, or
{"clip_l": ...}; T5 has no TI). A family without TI slots refuses embeddings.

Formats read:
- diffusers `learned_embeds.safetensors`: {token: [dim] or [n, dim]};
- A1111 safetensors: {"emb_params": [n, dim]} (A1111 takes the prompt word from the file name);
- SDXL (A1111/ComfyUI/civitai): {"clip_l": [n, 768], "clip_g": [n, 1280]}, one set of vectors
  per text encoder.

Stored layout (`learned_embeds.safetensors`): SD1.x/2.x {trigger_token: tensor} exactly as
diffusers' `load_textual_inversion(path)` expects (shape and dtype unchanged, multi-vector
kept: diffusers expands [n, dim] to tokens `t`, `t_1`, ... `t_{n-1}`); SDXL {"clip_l", "clip_g"}
(load each with `load_textual_inversion(sd[k], token=..., text_encoder=..., tokenizer=...)`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from services.common.errors import FailedPrecondition, InvalidInput
from services.families import SDXL
from services.registry.interop.kohya import key_map
from services.registry.interop.shapes import BaseModelShapes
from services.registry.interop.validate import check_embedding

FIELD = "file"
SDXL_KEYS = {slot.ti_key: slot.encoder for slot in SDXL.ti_slots}  # {"clip_l": ..., "clip_g": ...}
A1111_KEY = "emb_params"
_FORMAT_KEYS = frozenset({A1111_KEY, *SDXL_KEYS})  # keys that name a format, never a token
_TOKEN_RE = re.compile(r"^\S{1,64}$")
MAX_VECTORS = 64  # more than any published embedding; bounds prompt-token expansion


def check_token(token: str, field: str = "trigger_token") -> str:
    """A trigger token is 1-64 non-whitespace characters (it must survive prompt splitting)."""
    if not _TOKEN_RE.match(token):
        raise InvalidInput(field, f"trigger token {token!r} must be 1-64 characters without whitespace")
    return token


def choose_token(explicit: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], filename: str) -> str:
    """The caller's token, else the diffusers key, else metadata "name", else the file name (A1111's rule)."""
    if explicit:
        return check_token(explicit)
    keys = list(tensors)
    if len(keys) == 1 and keys[0] not in _FORMAT_KEYS:
        return check_token(keys[0], FIELD)
    if metadata.get("name"):
        return check_token(metadata["name"].strip(), FIELD)
    stem = re.sub(r"\s+", "-", Path(filename or "embedding").stem.strip()) or "embedding"
    return check_token(stem[:64], FIELD)


def import_embedding(
    tensors: dict[str, torch.Tensor], shapes: BaseModelShapes, token: str
) -> tuple[dict[str, torch.Tensor], int]:
    """Validate against the base model and return (stored tensors, vector count)."""
    family = shapes.model_family
    slots = family.ti_slots
    if not slots:
        raise FailedPrecondition(f"base model {shapes.name!r} is {family.title} ({family.name}), "
                                 "which has no Textual Inversion", FIELD)
    if set(tensors) == set(SDXL_KEYS):
        return _import_sdxl(tensors, shapes)
    if len(tensors) != 1:
        raise InvalidInput(FIELD, f"an embedding file holds one tensor (or clip_l + clip_g), got {sorted(tensors)}")
    key, value = next(iter(tensors.items()))
    if len(slots) > 1:
        wanted = " and ".join(repr(slot.ti_key) for slot in slots)
        raise FailedPrecondition(
            f"{key}: base model {shapes.name!r} is {family.title} and needs an embedding with both {wanted} "
            "vectors; this file has a single text-encoder embedding (SD1.x/2.x, or Flux CLIP-L)",
            FIELD,
        )
    n = _bounded(check_embedding(shapes, key, tuple(value.shape), slots[0].encoder), key)
    return {token: value.contiguous()}, n


def _bounded(n: int, key: str) -> int:
    if n > MAX_VECTORS:
        raise InvalidInput(FIELD, f"{key}: {n} vectors; at most {MAX_VECTORS} are allowed")
    return n


def _import_sdxl(tensors: dict[str, torch.Tensor], shapes: BaseModelShapes) -> tuple[dict[str, torch.Tensor], int]:
    counts = {
        k: _bounded(check_embedding(shapes, k, tuple(tensors[k].shape), comp), k) for k, comp in SDXL_KEYS.items()
    }
    if counts["clip_l"] != counts["clip_g"]:
        raise InvalidInput(FIELD, f"clip_l has {counts['clip_l']} vectors but clip_g has {counts['clip_g']}")
    return {k: tensors[k].contiguous() for k in SDXL_KEYS}, counts["clip_l"]


def stored_vectors(stored: dict[str, torch.Tensor]) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(token or None for SDXL, tensors) of a stored learned_embeds file."""
    if set(stored) == set(SDXL_KEYS):
        return None, stored
    if len(stored) != 1:
        raise FailedPrecondition(f"stored embedding has unexpected keys {sorted(stored)}", "ref")
    token, value = next(iter(stored.items()))
    return token, {token: value}


def export_a1111(
    stored: dict[str, torch.Tensor], shapes: BaseModelShapes, title: str, trigger: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stored embedding -> A1111 safetensors ({"emb_params": [n, dim]} or clip_l/clip_g)."""
    token, vectors = stored_vectors(stored)
    if token is None:
        out = {k: v.contiguous() for k, v in vectors.items()}
    else:
        value = vectors[token]
        out = {A1111_KEY: (value.unsqueeze(0) if value.ndim == 1 else value).contiguous()}
    arch = key_map(shapes).spec(shapes.architecture)["architecture"]
    meta = {
        "name": trigger or token or title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/textual-inversion",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.trigger_phrase": trigger or token or title,
    }
    return out, meta
