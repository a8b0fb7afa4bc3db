"""Import an adapter file trained elsewhere into the registry.

Flow: refuse pickles (by name and content) -> parse the safetensors header (no tensor is
loaded for LoRAs) -> check the base model exists -> pick a format handler -> the handler
turns the file into the registry's canonical diffusers layout -> publish a new version.

Formats are a tuple of `FormatHandler`s tried in order (or picked by `format_hint`).
This module knows plain diffusers/PEFT LoRA and diffusers textual inversion; the interop
package adds kohya / A1111 / SDXL handlers: when `services.registry.interop` defines
`import_handlers() -> tuple[FormatHandler, ...]`, those are tried before the built-in ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.errors import InvalidInput
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE, AdapterKindName, AdapterManifest
from services.registry.names import validate_name
from services.registry.registry import Registry
from services.registry.safety import ensure_safetensors, refuse_pickle_name, tensor_names

_TOKEN = re.compile(r"^\S{1,64}$")
_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_down.", ".lora_up.", "lora_linear_layer")
MAX_TI_VECTORS = 64


@dataclass(frozen=True)
class ImportSource:
    """What a handler sees: the uploaded file, its parsed header and the caller's hints."""

    path: Path
    filename: str
    header: dict[str, Any]
    kind_hint: AdapterKindName | None
    trigger_token: str

    @property
    def keys(self) -> list[str]:
        return tensor_names(self.header)


@dataclass(frozen=True)
class Converted:
    """The canonical form to publish: files by manifest path, kind, tokens, provenance."""

    kind: AdapterKindName
    files: dict[str, Path]
    source_format: str
    trigger_tokens: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FormatHandler:
    """One foreign format: `detect` looks at the header only; `convert` may write into workdir."""

    name: str
    detect: Callable[[ImportSource], bool]
    convert: Callable[[ImportSource, Path], Converted]


# --- diffusers / PEFT LoRA -------------------------------------------------------------
def _is_diffusers_lora(src: ImportSource) -> bool:
    keys = src.keys
    if not keys or any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return False
    return all(any(m in k for m in _LORA_MARKERS) or k.endswith(".alpha") for k in keys)


def _convert_diffusers_lora(src: ImportSource, workdir: Path) -> Converted:
    return Converted(kind="LORA", files={LORA_WEIGHTS_FILE: src.path}, source_format="diffusers")


# --- diffusers textual inversion -------------------------------------------------------
def _is_diffusers_ti(src: ImportSource) -> bool:
    keys = src.keys
    if not keys or len(keys) > 4 or any("lora" in k.lower() for k in keys):
        return False
    if set(keys) & {"emb_params", "string_to_param", "clip_l", "clip_g"}:
        return False  # A1111 / SDXL embeddings: the interop handlers
    return all(len(src.header[k]["shape"]) in (1, 2) for k in keys)


def _convert_diffusers_ti(src: ImportSource, workdir: Path) -> Converted:
    keys = src.keys
    if len(keys) != 1:
        raise InvalidInput("file", f"a textual inversion file holds one token's embedding; found {len(keys)}")
    shape = src.header[keys[0]]["shape"]
    if len(shape) == 2 and not 1 <= shape[0] <= MAX_TI_VECTORS:
        raise InvalidInput("file", f"embedding has {shape[0]} vectors; 1..{MAX_TI_VECTORS} allowed")
    token = src.trigger_token or keys[0]
    path = src.path if token == keys[0] else _rename_tensor(src.path, keys[0], token, workdir)
    return Converted(
        kind="TEXTUAL_INVERSION", files={TI_EMBEDS_FILE: path}, source_format="diffusers", trigger_tokens=[token]
    )


def _rename_tensor(path: Path, old: str, new: str, workdir: Path) -> Path:
    """Rewrite a (tiny) TI file so its key is the token users will type."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    out = workdir / TI_EMBEDS_FILE
    save_file({new: tensors[old]}, str(out))
    return out


def format_handlers() -> tuple[FormatHandler, ...]:
    """Handlers in detection order; interop prepends its own (kohya, A1111, SDXL) here."""
    base = (
        FormatHandler("diffusers", _is_diffusers_lora, _convert_diffusers_lora),
        FormatHandler("diffusers", _is_diffusers_ti, _convert_diffusers_ti),
    )
    if importlib.util.find_spec("services.registry.interop") is None:
        return base
    interop = importlib.import_module("services.registry.interop")
    extra: Callable[[], tuple[FormatHandler, ...]] | None = getattr(interop, "import_handlers", None)
    return (*extra(), *base) if extra else base


def pick_handler(src: ImportSource, format_hint: str) -> FormatHandler:
    """The handler for the hinted format (first whose detect matches), or the first that detects."""
    handlers = format_handlers()
    if format_hint:
        named = [h for h in handlers if h.name == format_hint]
        if not named:
            raise InvalidInput("format", f"import from {format_hint!r} is not supported")
        return next((h for h in named if h.detect(src)), named[0])
    for handler in handlers:
        if handler.detect(src):
            return handler
    raise InvalidInput(
        "file", "unrecognised adapter layout: expected a diffusers/PEFT LoRA or a textual-inversion embedding"
    )


# --- entry point -----------------------------------------------------------------------
def import_adapter_file(
    registry: Registry,
    tenant: str,
    *,
    name: str,
    base_model: str,
    kind_hint: AdapterKindName | None,
    format_hint: str,
    filename: str,
    path: Path,
    description: str = "",
    trigger_token: str = "",
    local_base_models: Collection[str] = (),
) -> AdapterManifest:
    """Validate, convert and publish one uploaded adapter file as a new version.

    `local_base_models` names base models served from local folders (settings
    base_model_paths) that are valid targets without being in the registry.
    Errors: InvalidInput (names, pickles, malformed or unrecognised files, kind mismatch),
    NotFound (unknown base model).
    """
    validate_name(name, "name")
    validate_name(base_model, "base_model")
    if trigger_token and not _TOKEN.fullmatch(trigger_token):
        raise InvalidInput("trigger_token", "must be 1-64 characters without whitespace")
    refuse_pickle_name(filename or path.name, "filename")
    header = ensure_safetensors(path, "file")
    digest = "" if base_model in local_base_models else registry.get_base_model(base_model).digest
    src = ImportSource(path=path, filename=filename, header=header, kind_hint=kind_hint, trigger_token=trigger_token)
    handler = pick_handler(src, format_hint)
    with tempfile.TemporaryDirectory(prefix="atelier-import-") as workdir:
        converted = handler.convert(src, Path(workdir))
        if kind_hint and converted.kind != kind_hint:
            raise InvalidInput("kind", f"the file is a {converted.kind} adapter, not {kind_hint}")
        return registry.publish_adapter(
            tenant,
            name,
            kind=converted.kind,
            base_model=base_model,
            base_model_digest=digest,
            files=converted.files,
            trigger_tokens=converted.trigger_tokens,
            source_format=converted.source_format,
            description=description,
        )
