"""Recognise what a foreign adapter file is from its safetensors header alone.

Detection reads only tensor names, shapes and the `__metadata__` strings, never tensor
data, and never unpickles anything: pickle-based checkpoints (`torch.save` zips, raw
pickle streams) are refused with instructions for converting them in a sandbox.
Formats we do not implement (LyCORIS LoHa/LoKr/..., DoRA) are refused by name so the
user knows why, instead of being half-loaded (diffusers silently drops DoRA scales).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput

FIELD = "file"

KIND_LORA = "LORA"
KIND_TI = "TEXTUAL_INVERSION"
KIND_DREAMBOOTH = "DREAMBOOTH"

FMT_DIFFUSERS = "diffusers"
FMT_KOHYA = "kohya"
FMT_A1111 = "a1111"
FMT_CHECKPOINT = "checkpoint"  # a single-file (LDM) checkpoint: DreamBooth export only

PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"})
MAX_HEADER_BYTES = 100 * 1024 * 1024

# lora_transformer_: flattened diffusers paths of a transformer denoiser (OneTrainer-style Flux files).
KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te_", "lora_te1_", "lora_te2_")
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_SGM_WORDS = ("input_blocks", "middle_block", "output_blocks")
_BFL_WORDS = ("lora_unet_double_blocks_", "lora_unet_single_blocks_", "lora_unet_final_layer_")

# Tensor-name suffix pattern -> human name of the LyCORIS algorithms we refuse.
_LYCORIS = (
    (re.compile(r"\.hada_(w|t)\d"), "LoHa (Hadamard product)"),
    (re.compile(r"\.lokr_(w|t)\d"), "LoKr (Kronecker product)"),
    (re.compile(r"\.lora_mid\.weight$"), "LoCon with Tucker decomposition"),
    (re.compile(r"\.oft_(blocks|diag)$"), "OFT"),
    (re.compile(r"\.(a|b)(1|2)\.weight$"), "GLoRA"),
    (re.compile(r"\.on_input$"), "(IA)^3"),
    (re.compile(r"\.diff(_b)?$"), "full-weight difference"),
)

_DIFFUSERS_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.",
                           "_lora.up.", ".lora_linear_layer.")

PICKLE_HELP = (
    "pickle checkpoints (.pt/.ckpt/.bin) can execute arbitrary code when loaded, so Atelier "
    "never unpickles them. Convert the file to safetensors yourself in a trusted, isolated "
    "environment (a throw-away container without credentials or network), e.g. "
    "`torch.load(path, weights_only=True, map_location='cpu')` then "
    "`safetensors.torch.save_file(tensors, 'out.safetensors')`; for an A1111 embedding save "
    "`{'emb_params': data['string_to_param']['*']}`, then import the .safetensors file"
)


@dataclass(frozen=True)
class Detection:
    """What a file is: adapter kind, source format and a variant detail for messages."""

    kind: str
    source_format: str
    variant: str = ""


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header: tensor name -> (dtype, shape), plus string metadata."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]

    @property
    def keys(self) -> list[str]:
        return sorted(self.tensors)


def refuse_pickle(head: bytes, filename: str) -> None:
    """Raise InvalidInput when the name or the first bytes say "pickle"."""
    suffix = Path(filename).suffix.lower()
    what = ""
    if head.startswith(b"PK\x03\x04"):
        what = "a zip archive written by torch.save (it contains a pickle)"
    elif len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5:
        what = f"a Python pickle (protocol {head[1]})"
    elif suffix in PICKLE_SUFFIXES:
        what = f"a {suffix} file, a pickle-based format"
    if what:
        raise InvalidInput(FIELD, f"{filename or 'the file'} is {what}; {PICKLE_HELP}")


def read_header(path: Path, filename: str = "") -> Header:
    """Parse the safetensors header of `path` (after refusing pickles); data is not read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        refuse_pickle(head, filename or path.name)
        if len(head) < 8:
            raise InvalidInput(FIELD, f"not a safetensors file: only {size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise InvalidInput(FIELD, f"not a safetensors file: header length {n} is invalid")
        raw = f.read(n)
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidInput(FIELD, "not a safetensors file: the header is not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput(FIELD, "not a safetensors file: the header is not a JSON object")
    return _header_from_doc(doc, size - 8 - n)


def _header_from_doc(doc: dict[str, Any], data_len: int) -> Header:
    meta_raw = doc.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in doc.items():
        try:
            start, end = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise InvalidInput(FIELD, f"safetensors entry {name!r} is malformed") from None
        if not 0 <= start <= end <= data_len:
            raise InvalidInput(FIELD, f"safetensors entry {name!r} lies outside the file (truncated?)")
        tensors[name] = (dtype, shape)
    if not tensors:
        raise InvalidInput(FIELD, "the safetensors file holds no tensors")
    return Header(tensors, metadata)


def detect(header: Header) -> Detection:
    """Classify a header; raise InvalidInput for refused or unknown layouts."""
    keys = header.keys
    _refuse_unsupported(keys)
    if set(keys) == {"emb_params"}:
        return Detection(KIND_TI, FMT_A1111, "emb_params")
    if {"clip_l", "clip_g"} <= set(keys) and len(keys) == 2:
        return Detection(KIND_TI, FMT_A1111, "sdxl")
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        bad = next((k for k in keys if not k.endswith(KOHYA_SUFFIXES)), None)
        if bad is not None:
            raise InvalidInput(FIELD, f"kohya LoRA key {bad!r} is not a lora_down/lora_up/alpha tensor")
        if any(k.startswith(_BFL_WORDS) for k in keys):
            return Detection(KIND_LORA, FMT_KOHYA, "bfl")
        sgm = any(w in k for k in keys for w in _SGM_WORDS)
        return Detection(KIND_LORA, FMT_KOHYA, "sgm" if sgm else "diffusers-names")
    if any(m in k for k in keys for m in _DIFFUSERS_LORA_MARKERS):
        peft = any(".lora_A." in k or ".lora_B." in k for k in keys)
        return Detection(KIND_LORA, FMT_DIFFUSERS, "peft" if peft else "diffusers-old")
    if len(keys) == 1 and len(header.tensors[keys[0]][1]) in (1, 2):
        return Detection(KIND_TI, FMT_DIFFUSERS, "learned_embeds")
    sample = ", ".join(repr(k) for k in keys[:3])
    raise InvalidInput(
        FIELD,
        f"unrecognised adapter file (first keys: {sample}); expected a diffusers/PEFT or kohya LoRA, "
        "or a diffusers/A1111 textual-inversion embedding",
    )


def _refuse_unsupported(keys: list[str]) -> None:
    for key in keys:
        for pattern, algo in _LYCORIS:
            if pattern.search(key):
                raise InvalidInput(
                    FIELD,
                    f"{key!r} is a LyCORIS {algo} tensor; LyCORIS LoHa/LoKr/OFT/(IA)^3/GLoRA adapters are "
                    "not supported. Re-train or extract it as a plain LoRA (kohya networks.lora) to import it",
                )
        if "dora_scale" in key or "lora_magnitude_vector" in key:
            raise InvalidInput(
                FIELD,
                f"{key!r} is a DoRA magnitude tensor; DoRA adapters are not supported "
                "(loaders that ignore it would silently change the result)",
            )
