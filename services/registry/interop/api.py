"""The interop entry points the registry calls: import a foreign file, export a stored adapter.

Pure file-to-file functions over a `BaseModelShapes`: no registry, store or gRPC here, so
the registry's import/export modules stay thin and these are testable on their own.
"""

from __future__ import annotations

import collections
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition, InvalidInput
from services.registry.interop.detect import (
    FMT_A1111,
    FMT_CHECKPOINT,
    FMT_DIFFUSERS,
    FMT_KOHYA,
    KIND_DREAMBOOTH,
    KIND_LORA,
    KIND_TI,
    detect,
    read_header,
)
from services.registry.interop.diffusers_lora import normalise
from services.registry.interop.dreambooth import assemble_pipeline, write_single_file, zip_folder
from services.registry.interop.kohya import export_kohya, import_kohya, key_map, split_original_names
from services.registry.interop.lora_layout import ModuleLora, load_stored, save_stored
from services.registry.interop.shapes import BaseModelShapes
from services.registry.interop.textual_inversion import choose_token, export_a1111, import_embedding
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE

ORIGINAL_DIR = "original"
EXPORT_FORMATS = (FMT_DIFFUSERS, FMT_KOHYA, FMT_A1111, FMT_CHECKPOINT)


@dataclass(frozen=True)
class Imported:
    """A converted upload: files by manifest path (stored layout + `original/<name>`)."""

    kind: str
    source_format: str
    variant: str
    files: dict[str, Path]
    trigger_tokens: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def original_path(filename: str) -> str:
    """`original/<file name>` with a conservative character set (manifest paths are validated)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename or "adapter.safetensors").name).strip("._")
    if not name.lower().endswith(".safetensors"):
        name = f"{name or 'adapter'}.safetensors"
    return f"{ORIGINAL_DIR}/{name[-120:]}"


def check_hints(kind: str, fmt: str, kind_hint: str, format_hint: str) -> None:
    if kind_hint == KIND_DREAMBOOTH:
        raise InvalidInput("kind", "DreamBooth weights are imported as a base model (ImportBaseModel), not an adapter")
    if kind_hint and kind_hint != kind:
        raise InvalidInput("kind", f"the file is a {kind} adapter, not {kind_hint}")
    if format_hint == FMT_CHECKPOINT:
        raise InvalidInput("format", "single-file checkpoints are imported as base models, not adapters")
    if format_hint and format_hint != fmt:
        raise InvalidInput("format", f"the file is in {fmt} format, not {format_hint}")


def import_file(
    path: Path,
    filename: str,
    shapes: BaseModelShapes,
    workdir: Path,
    *,
    kind_hint: str = "",
    format_hint: str = "",
    trigger_token: str = "",
) -> Imported:
    """Detect, validate against the base model and convert one uploaded file.

    InvalidInput: pickles, unsupported/unknown layouts, hint mismatches; FailedPrecondition:
    tensors that do not fit the base model (first offending key named).
    """
    header = read_header(path, filename)
    det = detect(header)
    check_hints(det.kind, det.source_format, kind_hint, format_hint)
    tensors = load_file(str(path))
    files = {original_path(filename or path.name): path}
    if det.kind == KIND_LORA:
        mods, variant = _import_lora(tensors, header.metadata, det, shapes)
        save_stored(mods, workdir / LORA_WEIGHTS_FILE)
        files[LORA_WEIGHTS_FILE] = workdir / LORA_WEIGHTS_FILE
        return Imported(KIND_LORA, det.source_format, variant, files, [], lora_details(mods))
    token = choose_token(trigger_token, tensors, header.metadata, filename or path.name)
    stored, vectors = import_embedding(tensors, shapes, token)
    save_file(stored, str(workdir / TI_EMBEDS_FILE))
    files[TI_EMBEDS_FILE] = workdir / TI_EMBEDS_FILE
    details = {"vectors": vectors, "text_encoders": 2 if len(stored) == 2 else 1}
    return Imported(KIND_TI, det.source_format, det.variant, files, [token], details)


def _import_lora(tensors: dict[str, Any], metadata: dict[str, str], det: Any,
                 shapes: BaseModelShapes) -> tuple[list[ModuleLora], str]:
    """(modules, variant) of a LoRA file. PEFT-keyed tensors under the family's original prefixes
    (Flux `diffusion_model.`) that use original module names go through the kohya table (their
    names and fused modules are kohya's); the rest are diffusers-named."""
    if det.source_format == FMT_KOHYA:
        return import_kohya(tensors, shapes), det.variant
    prefixes = tuple(key_map(shapes).ORIGINAL_PREFIXES) if _has_prefix(tensors, shapes) else ()
    renamed, users = split_original_names(tensors, shapes) if prefixes else ({}, {})
    rest = {k: v for k, v in tensors.items() if k not in set(users.values())}
    mods = import_kohya(renamed, shapes, users) if renamed else []
    if rest or not mods:
        mods += normalise(rest, metadata, shapes, prefixes)
    return mods, "original-names" if renamed else det.variant


def _has_prefix(tensors: dict[str, Any], shapes: BaseModelShapes) -> bool:
    """Whether any key is outside the diffusers components (then the family's key map decides)."""
    components = shapes.model_family.components
    return any(k.partition(".")[0] not in components for k in tensors)


def lora_details(mods: list[ModuleLora]) -> dict[str, Any]:
    """Summary for the manifest: the file's own rank/alpha (scales are folded when stored)."""
    ranks = collections.Counter(m.rank for m in mods)
    alphas = collections.Counter(m.alpha for m in mods)
    return {
        "rank": ranks.most_common(1)[0][0],
        "source_alpha": alphas.most_common(1)[0][0],
        "modules": len(mods),
        "components": sorted({m.component for m in mods}),
    }


def _unsupported(kind: str, fmt: str) -> FailedPrecondition:
    hints = {
        "LORA": "diffusers or kohya (A1111/ComfyUI read kohya)",
        "TEXTUAL_INVERSION": "diffusers or a1111",
        "DREAMBOOTH": "diffusers (zipped folder) or checkpoint (single file)",
    }
    return FailedPrecondition(f"a {kind} adapter cannot be exported as {fmt!r}; use {hints.get(kind, '')}", "format")


def export_lora(stored: Path, shapes: BaseModelShapes, fmt: str, dest: Path, title: str,
                description: str = "", trigger: str = "") -> Path:
    """Stored LoRA -> `dest` in diffusers (copy) or kohya (also for fmt "a1111") format."""
    if fmt in ("", FMT_DIFFUSERS):
        shutil.copyfile(stored, dest)
        return dest
    if fmt not in (FMT_KOHYA, FMT_A1111):
        raise _unsupported(KIND_LORA, fmt)
    tensors, meta = export_kohya(_stored_modules(stored, shapes, fmt), shapes, title, description, trigger)
    save_file(tensors, str(dest), metadata=meta)
    return dest


DORA_MAGNITUDE = ".lora_magnitude_vector"  # peft DoRA's per-layer magnitude, as diffusers saves it


def _stored_modules(stored: Path, shapes: BaseModelShapes, fmt: str) -> list[ModuleLora]:
    """The stored LoRA's modules. A version kept in diffusers' older key spelling (`lora.down`,
    attention processors: published as uploaded, e.g. imported while the base model's configs
    were unreadable) is renamed as an import would; one that still holds no LoRA module cannot
    be converted, which is the stored version's state, not the caller's input."""
    with safe_open(str(stored), framework="pt") as f:
        keys: list[str] = f.keys()  # a safe_open handle is not iterable
        if any(key.endswith(DORA_MAGNITUDE) for key in keys):
            raise FailedPrecondition(f"a DoRA LoRA cannot be exported as {fmt!r}: kohya's layout has no "
                                     "magnitude vectors; export it as 'diffusers'", "format")
    mods = load_stored(stored)
    if mods:
        return mods
    with safe_open(str(stored), framework="pt") as f:
        metadata = f.metadata() or {}
    try:
        return normalise(load_file(str(stored)), metadata, shapes)
    except InvalidInput as exc:
        raise FailedPrecondition(f"this LoRA version cannot be exported as {fmt!r}: {exc}", "format") from None


def export_embedding(stored: Path, shapes: BaseModelShapes, fmt: str, dest: Path, title: str,
                     trigger: str = "") -> Path:
    """Stored embedding -> `dest` in diffusers (copy) or A1111 (also for fmt "kohya") format."""
    if fmt in ("", FMT_DIFFUSERS):
        shutil.copyfile(stored, dest)
        return dest
    if fmt not in (FMT_A1111, FMT_KOHYA):
        raise _unsupported(KIND_TI, fmt)
    tensors, meta = export_a1111(load_file(str(stored)), shapes, title, trigger)
    save_file(tensors, str(dest), metadata=meta)
    return dest


def export_dreambooth(base_dir: Path, trained_dir: Path, shapes: BaseModelShapes, fmt: str,
                      dest: Path, title: str) -> Path:
    """DreamBooth -> zipped diffusers folder (fmt diffusers) or single-file checkpoint."""
    if fmt not in ("", FMT_DIFFUSERS, FMT_CHECKPOINT):
        raise _unsupported(KIND_DREAMBOOTH, fmt)
    if fmt == FMT_CHECKPOINT and not key_map(shapes).SINGLE_FILE_CHECKPOINT:
        family = shapes.model_family
        raise FailedPrecondition(f"single-file checkpoints of {family.title} ({family.name}) are not written; "
                                 "export the DreamBooth version as a diffusers folder", "format")
    pipeline = dest.parent / f"{dest.stem}-pipeline"
    try:
        assemble_pipeline(base_dir, trained_dir, pipeline)
        if fmt == FMT_CHECKPOINT:
            write_single_file(pipeline, shapes, dest, title)
        else:
            zip_folder(pipeline, dest)
    finally:
        shutil.rmtree(pipeline, ignore_errors=True)
    return dest


def read_metadata(path: Path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
