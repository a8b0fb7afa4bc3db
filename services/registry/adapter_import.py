"""Import an adapter file trained elsewhere into the registry.

Flow: check names -> refuse pickles (by name and content, with advice on converting them
safely) -> parse the safetensors header -> resolve the base model (registry, or a local
folder) -> `services.registry.interop.import_file` detects the format (diffusers/PEFT,
kohya, A1111, SDXL embeddings), validates every tensor against the base model's module
table and writes our stored layout -> publish a new version with the stored file, the
untouched upload as `original/<name>`, the detected `source_format` and an `import` summary
in training_config.

The version records the base model's family (`base_family`): the family the module table was
built for, else the base model manifest's recorded `family`, else detection on the local
folder, so inference can refuse an adapter of another family before loading anything.

Validation needs the base model's configs. When they are not readable (a base model that
is only a name in `local_base_models`, or a folder without a real `unet/config.json`),
only files already in our layout (diffusers LoRA / textual inversion) are accepted, stored
as uploaded; converting formats need the module table and are refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import NamedTuple, cast

from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition, InvalidInput
from services.registry.base_models import family_name_of
from services.registry.interop import BaseModelShapes, detect, import_file, read_header
from services.registry.interop.api import check_hints
from services.registry.interop.detect import FMT_DIFFUSERS, KIND_LORA, Detection
from services.registry.interop.shapes import CONFIG_FILES
from services.registry.interop.textual_inversion import MAX_VECTORS, check_token
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE, AdapterKindName, AdapterManifest
from services.registry.names import parse_base_ref, validate_name
from services.registry.registry import Registry
from services.registry.safety import refuse_non_finite

log = logging.getLogger(__name__)
IMPORT_FORMATS = ("", "diffusers", "kohya", "a1111", "checkpoint")
LocalBaseModels = Collection[str] | Mapping[str, Path]


class ResolvedBase(NamedTuple):
    """A base model as import/export need it: digest ("" for local), module table (None when its
    configs are unreadable) and services.families name ("" when unknown)."""

    digest: str
    shapes: BaseModelShapes | None
    family: str


def resolve_base_model(registry: Registry, name: str, local_base_models: LocalBaseModels = ()) -> ResolvedBase:
    """The registry or local base model `name`; NotFound otherwise."""
    if name in local_base_models:
        folder = local_base_models[name] if isinstance(local_base_models, Mapping) else None
        if folder is None:
            return ResolvedBase("", None, "")
        shapes = _usable_configs(_read_configs(Path(folder)), name)
        return ResolvedBase("", shapes, shapes.family if shapes else family_name_of(Path(folder)))
    manifest = registry.base_models.get(name)
    configs = {}
    for record in manifest.files:
        if record.path in CONFIG_FILES:
            try:
                configs[record.path] = json.loads(registry.blobs.read(record.sha256))
            except json.JSONDecodeError:
                log.warning("base model config is not JSON", extra={"base_model": name, "path": record.path})
    shapes = _usable_configs(configs, name)
    return ResolvedBase(manifest.digest, shapes, shapes.family if shapes else manifest.family)


def _read_configs(folder: Path) -> dict[str, dict[str, object]]:
    configs: dict[str, dict[str, object]] = {}
    for rel in CONFIG_FILES:
        if (folder / rel).is_file():
            configs[rel] = json.loads((folder / rel).read_text())
    return configs


def _usable_configs(configs: dict[str, dict[str, object]], name: str) -> BaseModelShapes | None:
    """The module table, or None when no config is a denoiser of a known family (imports are
    then stored unvalidated)."""
    try:
        return BaseModelShapes.from_configs(configs, name=name)
    except FailedPrecondition:
        log.warning("base model has no diffusers denoiser config; imports are not validated",
                    extra={"base_model": name})
        return None


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
    local_base_models: LocalBaseModels = (),
) -> AdapterManifest:
    """Validate, convert and publish one uploaded adapter file as a new version.

    Errors: InvalidInput (names, pickles, malformed/unsupported/unrecognised files, kind or
    format mismatch, NaN/inf tensors), NotFound (unknown base model), FailedPrecondition (tensors that do not
    fit the base model, naming the first offending key).
    """
    validate_name(name, "name")
    base_name, _ = parse_base_ref(base_model, "base_model")  # `name@N` validates against that version
    if format_hint not in IMPORT_FORMATS:
        raise InvalidInput("format", f"import from {format_hint!r} is not supported")
    if trigger_token:
        check_token(trigger_token)
    filename = filename or path.name
    header = read_header(path, filename)
    digest, shapes, family = resolve_base_model(registry, base_model, local_base_models)
    with tempfile.TemporaryDirectory(prefix="atelier-import-") as tmp:
        work = Path(tmp)
        if shapes is None:
            kind, fmt, files, tokens, summary = _store_as_is(detect(header), path, work, filename, trigger_token,
                                                             kind_hint or "", format_hint)
        else:
            imported = import_file(path, filename, shapes, work, kind_hint=kind_hint or "",
                                   format_hint=format_hint, trigger_token=trigger_token)
            kind, fmt, files, tokens = imported.kind, imported.source_format, imported.files, imported.trigger_tokens
            summary = {**imported.details, "variant": imported.variant, "filename": filename}
        refuse_non_finite(path, "file")  # the upload itself, so the error names the user's own key
        return registry.adapters.publish(
            tenant,
            name,
            kind=cast(AdapterKindName, kind),
            base_model=base_name,
            base_model_digest=digest,
            base_family=family,
            files=files,
            trigger_tokens=tokens,
            training_config={"import": summary},
            source_format=fmt,
            description=description,
        )


def _store_as_is(
    det: Detection, path: Path, work: Path, filename: str, trigger_token: str, kind_hint: str, format_hint: str
) -> tuple[str, str, dict[str, Path], list[str], dict[str, object]]:
    """Without a module table: accept only our own layouts, unconverted and unvalidated."""
    check_hints(det.kind, det.source_format, kind_hint, format_hint)
    if det.source_format != FMT_DIFFUSERS:
        raise FailedPrecondition(
            f"the file is a {det.source_format} {det.kind} file; converting it needs the base model's configs, "
            "which are not readable: import the base model into the registry first",
            "base_model",
        )
    summary: dict[str, object] = {"variant": det.variant, "filename": filename, "validated": False}
    if det.kind == KIND_LORA:
        return det.kind, det.source_format, {LORA_WEIGHTS_FILE: path}, [], summary
    tensors = load_file(str(path))
    key, value = next(iter(tensors.items()))
    if value.ndim == 2 and not 1 <= value.shape[0] <= MAX_VECTORS:
        raise InvalidInput("file", f"embedding has {value.shape[0]} vectors; 1..{MAX_VECTORS} allowed")
    token = trigger_token or check_token(key, "file")
    out = work / TI_EMBEDS_FILE
    if token == key:
        shutil.copyfile(path, out)
    else:
        save_file({token: value}, str(out))
    return det.kind, det.source_format, {TI_EMBEDS_FILE: out}, [token], summary
