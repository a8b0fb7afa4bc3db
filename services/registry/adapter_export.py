"""Export a stored adapter version in a foreign format (RegistryService.ExportAdapter).

The servicer streams the returned file; it serves plain diffusers exports of LoRA and TI
itself (the stored file is already diffusers layout) and calls `export_adapter` for every
other (kind, format): LoRA -> kohya (A1111/ComfyUI; module names from the base model's family
key map: SD 1.x/2.x, SDXL sgm, Flux BFL), TI -> A1111, DreamBooth -> zipped
diffusers pipeline or single-file checkpoint. Files are downloaded with digest checks;
module naming needs the base model's configs, DreamBooth exports its full weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidInput, NotFound
from services.families import mismatch
from services.registry.adapter_import import LocalBaseModels, resolve_base_model
from services.registry.interop import EXPORT_FORMATS, BaseModelShapes
from services.registry.interop.api import export_dreambooth, export_embedding, export_lora
from services.registry.interop.dreambooth import TRAINABLE
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE, AdapterManifest
from services.registry.registry import Registry

_SUFFIX = {"diffusers": ".zip", "checkpoint": ".safetensors"}


def export_adapter(
    registry: Registry,
    manifest: AdapterManifest,
    fmt: str,
    dest_dir: Path,
    local_base_models: LocalBaseModels = (),
) -> Path:
    """Write `manifest` in `fmt` under dest_dir and return the file (its name is the download name).

    Errors: InvalidInput (unknown format), FailedPrecondition (format impossible for the kind,
    base model configs unavailable), DataLoss (a stored blob fails its digest).
    """
    if fmt not in EXPORT_FORMATS:
        raise InvalidInput("format", f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")
    shapes = _shapes(registry, manifest, local_base_models)
    title = manifest.name
    trigger = manifest.trigger_tokens[0] if manifest.trigger_tokens else ""
    if manifest.kind == "LORA":
        stored = _download(registry, manifest, LORA_WEIGHTS_FILE, dest_dir)
        return export_lora(stored, shapes, fmt, dest_dir / f"{title}.safetensors", title,
                           manifest.description, trigger)
    if manifest.kind == "TEXTUAL_INVERSION":
        stored = _download(registry, manifest, TI_EMBEDS_FILE, dest_dir)
        return export_embedding(stored, shapes, fmt, dest_dir / f"{title}.safetensors", title, trigger)
    trained = dest_dir / "trained"
    for record in manifest.files:
        if record.path.split("/", 1)[0] in TRAINABLE:
            registry.blobs.download(record.sha256, trained / record.path)
    base = _base_folder(registry, _trained_base(registry, manifest), local_base_models, dest_dir)
    return export_dreambooth(base, trained, shapes, fmt, dest_dir / f"{title}{_SUFFIX.get(fmt, '.zip')}", title)


def _shapes(registry: Registry, manifest: AdapterManifest, local: LocalBaseModels) -> BaseModelShapes:
    try:
        shapes = resolve_base_model(registry, _trained_base(registry, manifest), local).shapes
    except NotFound:
        shapes = None
    if shapes is None:
        raise FailedPrecondition(
            f"base model {manifest.base_model!r} of {manifest.ref} is not in the registry with readable configs; "
            "foreign formats name modules after it, so import the base model first",
            "ref",
        )
    if manifest.base_family and manifest.base_family != shapes.family:
        raise mismatch(manifest.base_family, shapes.family)
    return shapes


def _trained_base(registry: Registry, manifest: AdapterManifest) -> str:
    """The base-model version the adapter was trained on (`name@N` by digest), else its name."""
    if manifest.base_model_digest:
        found = registry.base_models.find_digest(manifest.base_model, manifest.base_model_digest)
        if found is not None:
            return found.ref
    return manifest.base_model


def _download(registry: Registry, manifest: AdapterManifest, path: str, dest_dir: Path) -> Path:
    record = manifest.file(path)
    if record is None:
        raise FailedPrecondition(f"{manifest.ref} has no {path}", "ref")
    return registry.blobs.download(record.sha256, dest_dir / "stored" / path)


def _base_folder(registry: Registry, name: str, local: LocalBaseModels, dest_dir: Path) -> Path:
    if isinstance(local, Mapping) and name in local:
        return Path(local[name])
    return registry.base_models.materialize(name, dest_dir / "base")
