"""Training checkpoints: checkpoints/<tenant>/<job_id>/<step>.json naming blobs.

A worker that takes over an expired lease resumes from `latest`. Writing the same step
twice (a retry after a crash) simply replaces the manifest; the blobs are content
addressed, so nothing is duplicated. Checkpoint files obey the safetensors-only policy
(optimizer state too: save it with safetensors, plus JSON for scalars).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.common.errors import InvalidInput
from services.registry.blobs import Blobs
from services.registry.documents import read_doc
from services.registry.files import download_files, reupload_missing, upload_files
from services.registry.keys import Keys
from services.registry.manifests import CheckpointManifest
from services.registry.names import validate_name, validate_tenant
from services.registry.store import ObjectNotFound, ObjectStore


class Checkpoints:
    """Put, find, fetch and delete checkpoints of one training job."""

    def __init__(self, store: ObjectStore, keys: Keys, blobs: Blobs) -> None:
        self._store = store
        self._keys = keys
        self._blobs = blobs

    def put(self, tenant: str, job_id: str, step: int, files: Mapping[str, Path]) -> CheckpointManifest:
        """Store the files of one training step as blobs, then the step's manifest."""
        validate_tenant(tenant)
        validate_name(job_id, "job_id")
        if step < 0:
            raise InvalidInput("step", "must not be negative")
        records = upload_files(self._blobs, files, "files")
        manifest = CheckpointManifest(tenant=tenant, job_id=job_id, step=step, files=records)
        self._store.put_bytes(self._keys.checkpoint(tenant, job_id, step), manifest.to_json_bytes())
        reupload_missing(self._blobs, files, records)  # a concurrent GC may have swept a reused blob
        return manifest

    def latest(self, tenant: str, job_id: str) -> CheckpointManifest | None:
        """The newest step's manifest of a job, or None when it has none."""
        validate_tenant(tenant)
        validate_name(job_id, "job_id")
        keys = list(self._store.list_keys(self._keys.checkpoints_prefix(tenant, job_id)))
        for key in reversed(keys):
            try:
                manifest, _, _ = read_doc(self._store, key, CheckpointManifest)
            except ObjectNotFound:
                continue  # deleted concurrently
            return manifest
        return None

    def fetch(self, manifest: CheckpointManifest, dest_dir: Path) -> dict[str, Path]:
        """Download every file of a checkpoint into dest_dir (verified); path -> local file."""
        return download_files(self._blobs, manifest.files, dest_dir)

    def delete_all(self, tenant: str, job_id: str) -> None:
        """Delete every checkpoint manifest of a job (blobs go at garbage collection)."""
        validate_tenant(tenant)
        validate_name(job_id, "job_id")
        for key in list(self._store.list_keys(self._keys.checkpoints_prefix(tenant, job_id))):
            self._store.delete(key)
