"""Base models: a diffusers pipeline folder stored as blobs, shared by every tenant.

base-models/<name>/manifest.json lists (path, sha256, size) for every file. Only
safetensors weights and text configs are accepted, so `from_pretrained` on a
materialised copy can never unpickle anything. Materialising downloads into
<dest_root>/<digest>/ through a temporary directory renamed into place, so concurrent
callers (several inference replicas sharing a volume) never see a half-written model.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from services.common.errors import AlreadyExists, InvalidInput, NotFound
from services.registry.blobs import Blobs
from services.registry.documents import decode_token, encode_token, page_size, read_doc
from services.registry.files import download_files, upload_files
from services.registry.keys import Keys
from services.registry.manifests import BaseModelManifest, files_digest
from services.registry.names import validate_name
from services.registry.safety import PICKLE_EXTENSIONS
from services.registry.store import ObjectNotFound, ObjectStore, PreconditionFailed

ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".model", ".md"})
ARCHITECTURES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
}


def architecture_of(folder: Path) -> str:
    """Architecture name from model_index.json's `_class_name`; InvalidInput if absent."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise InvalidInput("folder", f"{folder} has no model_index.json: not a diffusers pipeline folder")
    try:
        class_name = str(json.loads(index.read_text())["_class_name"])
    except (ValueError, KeyError) as exc:
        raise InvalidInput("folder", f"model_index.json is not a diffusers index ({exc})") from None
    return ARCHITECTURES.get(class_name, class_name)


def collect_files(folder: Path) -> dict[str, Path]:
    """Relative path -> file for everything in the folder (dotfiles skipped), policy-checked."""
    files: dict[str, Path] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_EXTENSIONS:
            raise InvalidInput(
                "files", f"{rel}: pickle-based weights are refused; save the pipeline with safe_serialization"
            )
        if suffix not in ALLOWED_SUFFIXES:
            allowed = ", ".join(sorted(ALLOWED_SUFFIXES))
            raise InvalidInput("files", f"{rel}: unsupported file type (allowed: {allowed})")
        files[rel] = path
    return files


class BaseModels:
    """Import, read, list, materialise and delete base models."""

    def __init__(self, store: ObjectStore, keys: Keys, blobs: Blobs) -> None:
        self._store = store
        self._keys = keys
        self._blobs = blobs

    def import_folder(self, name: str, folder: Path, description: str) -> BaseModelManifest:
        validate_name(name, "name")
        if not folder.is_dir():
            raise InvalidInput("folder", f"{folder} is not a directory")
        architecture = architecture_of(folder)
        files = collect_files(folder)
        key = self._keys.base_model(name)
        if self._store.exists(key):
            raise AlreadyExists("base model", name)
        records = upload_files(self._blobs, files, "files")
        manifest = BaseModelManifest(
            name=name,
            digest=files_digest(records),
            architecture=architecture,
            files=records,
            description=description,
        )
        try:
            self._store.put_bytes(key, manifest.to_json_bytes(), if_none_match=True)
        except PreconditionFailed:
            raise AlreadyExists("base model", name) from None
        return manifest

    def get(self, name: str) -> BaseModelManifest:
        validate_name(name, "name")
        try:
            manifest, _, _ = read_doc(self._store, self._keys.base_model(name), BaseModelManifest)
        except ObjectNotFound:
            raise NotFound("base model", name) from None
        return manifest

    def list_page(self, requested_size: int, page_token: str) -> tuple[list[BaseModelManifest], str]:
        size = page_size(requested_size)
        after = decode_token(page_token, "base-models")
        prefix = self._keys.base_models_prefix()
        keys = self._store.list_keys(prefix, start_after=self._keys.base_model(after) if after else "")
        page: list[BaseModelManifest] = []
        for key in keys:
            if not key.endswith("/manifest.json"):
                continue
            try:
                manifest, _, _ = read_doc(self._store, key, BaseModelManifest)
            except ObjectNotFound:
                continue
            page.append(manifest)
            if len(page) == size:
                more = any(k.endswith("/manifest.json") for k in keys)
                return page, encode_token("base-models", manifest.name) if more else ""
        return page, ""

    def materialize(self, name: str, dest_root: Path) -> Path:
        manifest = self.get(name)
        target = dest_root / manifest.digest
        if target.is_dir():
            return target
        dest_root.mkdir(parents=True, exist_ok=True)
        tmp = dest_root / f".tmp-{manifest.digest[:16]}-{uuid.uuid4().hex}"
        try:
            download_files(self._blobs, manifest.files, tmp)
            try:
                tmp.rename(target)
            except OSError:
                if not target.is_dir():
                    raise  # not a lost race: a real error
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def delete(self, name: str) -> None:
        validate_name(name, "name")
        key = self._keys.base_model(name)
        if not self._store.exists(key):
            raise NotFound("base model", name)
        self._store.delete(key)
