"""Safetensors-only: the registry never stores or hands out a format that can run code.

Pickle-based checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) execute arbitrary code
when loaded, so they are refused by extension and by content (pickle opcodes, zip magic of
torch.save archives). A safetensors file is accepted only when its header parses: an
8-byte little-endian header length, a JSON object whose tensors lie inside the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput

PICKLE_EXTENSIONS = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib"})
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
_ZIP_MAGIC = b"PK\x03\x04"


def refuse_pickle_name(filename: str, field: str) -> None:
    """Refuse names whose extension marks a pickle-based checkpoint."""
    suffix = Path(filename).suffix.lower()
    if suffix in PICKLE_EXTENSIONS:
        raise InvalidInput(
            field,
            f"{filename!r}: {suffix} files are pickle-based and can execute code when loaded; "
            "only .safetensors weights are accepted (convert with safetensors.torch.save_file)",
        )


def _sniff_pickle(head: bytes) -> str | None:
    if head.startswith(_ZIP_MAGIC):
        return "a zip archive (torch.save format, which contains a pickle)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a Python pickle"
    return None


def _read_head(source: Path | bytes, n: int, offset: int = 0) -> bytes:
    if isinstance(source, bytes):
        return source[offset : offset + n]
    with open(source, "rb") as f:
        f.seek(offset)
        return f.read(n)


def _size(source: Path | bytes) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def ensure_safetensors(source: Path | bytes, field: str) -> dict[str, Any]:
    """Return the parsed safetensors header (tensor name -> info), or raise InvalidInput.

    Only the header is read; tensor data is never loaded. `__metadata__` is kept in the
    returned dict when present.
    """
    if isinstance(source, Path):
        refuse_pickle_name(source.name, field)
    total = _size(source)
    head = _read_head(source, 8)
    kind = _sniff_pickle(head)
    if kind:
        raise InvalidInput(field, f"the file is {kind}; only safetensors are accepted")
    if total < 8:
        raise InvalidInput(field, f"not a safetensors file: only {total} bytes")
    (header_len,) = struct.unpack("<Q", head)
    if header_len < 2 or header_len > MAX_HEADER_BYTES or 8 + header_len > total:
        raise InvalidInput(field, f"not a safetensors file: header length {header_len} invalid")
    try:
        header = json.loads(_read_head(source, header_len, 8))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(field, f"not a safetensors file: header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInput(field, "not a safetensors file: header is not a JSON object")
    _check_tensors(header, total - 8 - header_len, field)
    return header


def _check_tensors(header: dict[str, Any], data_len: int, field: str) -> None:
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise InvalidInput(field, f"safetensors entry {name!r} is malformed")
        offsets = info["data_offsets"]
        ok = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len
        )
        if not ok:
            raise InvalidInput(field, f"safetensors entry {name!r} points outside the file (truncated?)")


def tensor_names(header: dict[str, Any]) -> list[str]:
    """The tensor keys of a parsed header, without `__metadata__`."""
    return [k for k in header if k != "__metadata__"]


def first_non_finite(path: Path) -> str | None:
    """The first tensor (in file order) holding NaN or +-inf, or None when all are finite.

    Non-finite weights load fine and then generate black images with status OK, so imports and
    training publishes refuse them. Tensors are read one at a time (memory: the largest one).
    """
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = f.get_tensor(name)
            if not tensor.is_floating_point():
                continue
            if tensor.element_size() == 1:  # float8: isfinite is not implemented for it everywhere
                tensor = tensor.float()
            if not bool(torch.isfinite(tensor).all()):
                return str(name)
    return None


def refuse_non_finite(path: Path, field: str) -> None:
    """InvalidInput naming the first tensor with NaN or inf values."""
    name = first_non_finite(path)
    if name is not None:
        raise InvalidInput(field, f"tensor {name!r} holds non-finite values (NaN or inf); "
                                  "such weights generate black images")


def refuse_pickle_content(source: Path | bytes, field: str) -> None:
    """For non-safetensors files (configs): refuse anything that is really a pickle or zip."""
    kind = _sniff_pickle(_read_head(source, 8))
    if kind:
        raise InvalidInput(field, f"the file is {kind}; pickle-based files are refused")
