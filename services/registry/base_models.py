"""Base models: a diffusers pipeline folder stored as blobs, shared by every tenant, versioned.

Layout (under the registry prefix):
  base-models/<name>/versions/<n>.json   immutable, created with If-None-Match: *
  base-models/<name>/deleted/<n>.json    tombstone: a deleted number is never reused
  base-models/<name>/manifest.json       pre-versioning registries: read as version 1
A name can therefore never be re-pointed to other bytes: importing a new digest allocates
the next version, importing the digest of a live version returns that version. A reference
is `name` (the newest live version) or `name@N` (one version; `parse_base_ref`).

Only safetensors weights and text configs are accepted, so `from_pretrained` on a
materialised copy can never unpickle anything. Materialising downloads into
<dest_root>/<digest>/ through a temporary directory renamed into place, so concurrent
callers (several inference replicas sharing a volume) never see a half-written model.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from services.common.errors import DataLoss, FailedPrecondition, InvalidInput, NotFound, Unavailable
from services.families import detect as detect_family
from services.registry.blobs import Blobs
from services.registry.documents import checked_page_size, decode_token, encode_token, read_doc
from services.registry.files import download_files, upload_files
from services.registry.keys import Keys, number_from_key
from services.registry.manifests import BaseModelManifest, files_digest, utc_now
from services.registry.names import parse_base_ref, validate_name
from services.registry.safety import PICKLE_EXTENSIONS
from services.registry.store import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

ALLOWED_SUFFIXES = frozenset({".safetensors", ".json", ".txt", ".model", ".md"})
ARCHITECTURES = {
    "StableDiffusionPipeline": "stable-diffusion",
    "StableDiffusionXLPipeline": "stable-diffusion-xl",
}
MAX_IMPORT_ATTEMPTS = 64
LEGACY_VERSION = 1


def family_name_of(folder: Path) -> str:
    """The services.families name of a pipeline folder; "" for a pipeline of no known family
    (such folders may be stored, but trainers and inference refuse them)."""
    try:
        return detect_family(folder).name
    except FailedPrecondition:
        return ""


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
    """Import, resolve, list, materialise and delete base-model versions."""

    def __init__(self, store: ObjectStore, keys: Keys, blobs: Blobs) -> None:
        self._store = store
        self._keys = keys
        self._blobs = blobs

    # --- import ---------------------------------------------------------------------
    def import_folder(self, name: str, folder: Path, description: str = "") -> BaseModelManifest:
        """Upload the folder's files, then return the live version with this digest or create the next."""
        validate_name(name, "name")
        if not folder.is_dir():
            raise InvalidInput("folder", f"{folder} is not a directory")
        architecture = architecture_of(folder)
        records = upload_files(self._blobs, collect_files(folder), "files")
        draft = BaseModelManifest(name=name, digest=files_digest(records), architecture=architecture,
                                  family=family_name_of(folder), files=records, description=description)
        return self._allocate(draft)

    def _allocate(self, draft: BaseModelManifest) -> BaseModelManifest:
        """If-None-Match create of versions/<n+1>.json; a lost race re-checks for the same digest."""
        for _ in range(MAX_IMPORT_ATTEMPTS):
            same = next((m for m in self.versions(draft.name) if m.digest == draft.digest), None)
            if same is not None:
                return same  # idempotent: these bytes already are a live version
            manifest = draft.model_copy(update={"version": self._highest_number(draft.name) + 1,
                                                "created_at": utc_now()})
            key = self._keys.base_model_version(draft.name, manifest.version)
            try:
                self._store.put_bytes(key, manifest.to_json_bytes(), if_none_match=True)
            except PreconditionFailed:
                log.info("base model version taken concurrently; retrying",
                         extra={"base_model": draft.name, "version": manifest.version})
                continue
            return manifest
        raise Unavailable(f"could not allocate a version of base model {draft.name!r}: too many concurrent imports")

    def _highest_number(self, name: str) -> int:
        """Largest version ever allocated: live, tombstoned, or the legacy manifest (1)."""
        highest = LEGACY_VERSION if self._store.exists(self._keys.base_model(name)) else 0
        for prefix in (self._keys.base_model_versions_prefix(name), self._keys.base_model_tombstones_prefix(name)):
            last = _last(self._store.list_keys(prefix))
            if last:
                highest = max(highest, number_from_key(last))
        return highest

    # --- resolve --------------------------------------------------------------------
    def get(self, ref: str) -> BaseModelManifest:
        """The version `ref` names (`name` = newest live, `name@N`); NotFound otherwise."""
        name, version = parse_base_ref(ref, "name")
        if version is None:
            last = _last(self._store.list_keys(self._keys.base_model_versions_prefix(name)))
            if last is not None:
                version = number_from_key(last)
        if version is not None:
            found = self._read(name, version)
            if found is not None:
                return found
        if version in (None, LEGACY_VERSION):
            legacy = self._read_legacy(name)
            if legacy is not None:
                return legacy
        raise NotFound("base model", ref)

    def _read(self, name: str, version: int) -> BaseModelManifest | None:
        key = self._keys.base_model_version(name, version)
        try:
            manifest, _, _ = read_doc(self._store, key, BaseModelManifest)
        except ObjectNotFound:
            return None
        if (manifest.name, manifest.version) != (name, version):
            raise DataLoss(f"manifest at {key!r} names a different base model version")
        return manifest

    def _read_legacy(self, name: str) -> BaseModelManifest | None:
        key = self._keys.base_model(name)
        try:
            manifest, _, _ = read_doc(self._store, key, BaseModelManifest)
        except ObjectNotFound:
            return None
        if manifest.name != name:
            raise DataLoss(f"manifest at {key!r} names a different base model")
        return manifest.model_copy(update={"version": LEGACY_VERSION})

    def versions(self, name: str) -> list[BaseModelManifest]:
        """Every live version of `name`, oldest first ([] for an unknown name)."""
        validate_name(name, "name")
        legacy = self._read_legacy(name)
        found = [legacy] if legacy is not None else []
        for key in self._store.list_keys(self._keys.base_model_versions_prefix(name)):
            manifest = self._read(name, number_from_key(key))
            if manifest is not None:  # None: deleted while listing
                found.append(manifest)
        return found

    def find_digest(self, name: str, digest: str) -> BaseModelManifest | None:
        """The live version of `name` holding exactly these bytes (what an adapter was trained on)."""
        return next((m for m in self.versions(name) if m.digest == digest), None)

    # --- listing --------------------------------------------------------------------
    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[BaseModelManifest], str]:
        """One page of names, each as its newest live version; names with none are skipped."""
        size = checked_page_size(page_size)
        after = decode_token(page_token, "base-models")
        root = self._keys.base_models_prefix()
        keys = self._store.list_keys(root, start_after=f"{root}{after}/~" if after else "")
        groups = groupby(keys, key=lambda k: k[len(root) :].split("/", 1)[0])
        page: list[BaseModelManifest] = []
        for name, group in groups:
            manifest = self._newest_of(name, list(group))
            if manifest is None:
                continue
            page.append(manifest)
            if len(page) == size:
                more = next(groups, None) is not None
                return page, encode_token("base-models", name) if more else ""
        return page, ""

    def _newest_of(self, name: str, keys: list[str]) -> BaseModelManifest | None:
        versions = [k for k in keys if k.startswith(self._keys.base_model_versions_prefix(name))]
        for key in reversed(versions):
            manifest = self._read(name, number_from_key(key))
            if manifest is not None:
                return manifest
        return self._read_legacy(name) if self._keys.base_model(name) in keys else None

    # --- materialise ----------------------------------------------------------------
    def materialize(self, ref: str | BaseModelManifest, dest_root: Path) -> Path:
        """dest_root/<digest>/ holding the version's files; pass a manifest to pin what was resolved."""
        manifest = self.get(ref) if isinstance(ref, str) else ref
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

    # --- delete ---------------------------------------------------------------------
    def delete(self, ref: str) -> list[BaseModelManifest]:
        """Delete one version (`name@N`) or every live version (`name`); returns what went.

        A tombstone is written before the manifest goes, so the number is never reused and
        therefore never re-pointed to other bytes. Blobs stay until garbage collection.
        """
        name, version = parse_base_ref(ref, "name")
        doomed = [self.get(ref)] if version is not None else self.versions(name)
        if not doomed:
            raise NotFound("base model", ref)
        for manifest in doomed:
            self._tombstone(manifest)
        return doomed

    def _tombstone(self, manifest: BaseModelManifest) -> None:
        name, version = manifest.name, manifest.version
        stone = {"version": version, "digest": manifest.digest, "deleted_at": utc_now().isoformat()}
        self._store.put_bytes(self._keys.base_model_tombstone(name, version), json.dumps(stone).encode())
        self._store.delete(self._keys.base_model_version(name, version))
        if version == LEGACY_VERSION:
            self._store.delete(self._keys.base_model(name))


def _last(keys: Iterator[str]) -> str | None:
    last = None
    for last in keys:  # noqa: B007 - we want the final key of the sorted listing
        pass
    return last
