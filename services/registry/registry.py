"""The `Registry` facade: adapters, datasets, base models, checkpoints and blobs in one store.

Everything is synchronous (boto3 is); servicers call it through `asyncio.to_thread`. The
work lives in one module per resource (blobs, adapters, datasets, base_models,
checkpoints); this class only wires them to one store and key prefix, so callers have a
single object to inject. Errors are the typed errors of services.common.errors:
InvalidInput for bad names, NotFound/AdapterNotFound (never revealing other tenants),
PreconditionConflict for lost compare-and-swaps, DataLoss when stored bytes do not match
their digest, Unavailable (StoreUnavailable) when the store cannot be reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from services.common.config import Settings
from services.registry.adapters import Adapters
from services.registry.base_models import BaseModels
from services.registry.blobs import Blobs
from services.registry.checkpoints import Checkpoints
from services.registry.datasets import DatasetImageInput, Datasets
from services.registry.keys import Keys
from services.registry.manifests import (
    AdapterKindName,
    AdapterManifest,
    AdapterSummary,
    BaseModelManifest,
    CheckpointManifest,
    DatasetManifest,
    FileRecord,
)
from services.registry.store import ObjectStore, open_store
from services.registry.usage import tenant_stored_bytes


class Registry:
    """One registry over one object store; `prefix` namespaces all keys (tests, multi-env)."""

    def __init__(self, store: ObjectStore, prefix: str = "") -> None:
        self.store = store
        self.keys = Keys(prefix)
        self.blobs = Blobs(store, self.keys)
        self.base_models = BaseModels(store, self.keys, self.blobs)
        self.adapters = Adapters(store, self.keys, self.blobs)
        self.datasets = Datasets(store, self.keys, self.blobs)
        self.checkpoints = Checkpoints(store, self.keys, self.blobs)

    @classmethod
    def from_settings(cls, settings: Settings, prefix: str = "") -> Registry:
        """The registry named by settings.registry_url (file://DIR or s3://BUCKET[/PREFIX])."""
        return cls(open_store(settings), prefix)

    def stored_bytes(self, tenant: str) -> int:
        """Logical bytes of the tenant's adapter versions and datasets (see usage.py)."""
        return tenant_stored_bytes(self.store, self.keys, tenant)

    # --- blobs ----------------------------------------------------------------------
    def put_blob_file(self, path: Path) -> FileRecord:
        """Store a file as a content-addressed blob (streamed; multipart when large)."""
        return self.blobs.put_file(path)

    def put_blob_bytes(self, data: bytes) -> FileRecord:
        """Store small in-memory content as a blob."""
        return self.blobs.put_bytes(data)

    def read_blob(self, sha256: str) -> bytes:
        """Verified blob bytes; DataLoss on digest mismatch."""
        return self.blobs.read(sha256)

    def download_blob(self, sha256: str, dest: Path) -> Path:
        """Verified download to `dest`; on DataLoss `dest` is not created."""
        return self.blobs.download(sha256, dest)

    # --- adapters -------------------------------------------------------------------
    def publish_adapter(
        self,
        tenant: str,
        name: str,
        *,
        kind: AdapterKindName,
        base_model: str,
        base_model_digest: str = "",
        files: Mapping[str, Path],
        trigger_tokens: Sequence[str] = (),
        training_config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        source_job_id: str = "",
        source_format: str = "atelier",
        description: str = "",
    ) -> AdapterManifest:
        """Upload the files as blobs, then create the next version's manifest.

        `files` maps the path inside the adapter (e.g. "pytorch_lora_weights.safetensors")
        to a local file; `.safetensors` files must parse and pickle formats are refused.
        The version is claimed with a conditional create; a lost race retries with the
        next number, so concurrent publishers get distinct versions and none is lost. With
        `source_job_id`, the job's publish marker makes this idempotent: every publisher of
        one job gets the same single version (see services/registry/allocation.py).
        """
        return self.adapters.publish(
            tenant,
            name,
            kind=kind,
            base_model=base_model,
            base_model_digest=base_model_digest,
            files=files,
            trigger_tokens=trigger_tokens,
            training_config=dict(training_config or {}),
            metrics=dict(metrics or {}),
            source_job_id=source_job_id,
            source_format=source_format,
            description=description,
        )

    def job_version(self, tenant: str, name: str, job_id: str) -> AdapterManifest | None:
        """The version training job `job_id` published (its publish marker), or None."""
        return self.adapters.job_version(tenant, name, job_id)

    def resolve_adapter(
        self, tenant: str, name: str, version: int | None = None, alias: str | None = None
    ) -> AdapterManifest:
        """The manifest named by version, alias, or (neither) the latest version.

        Unknown tenant/name/version/alias -> AdapterNotFound, identical for a name that
        exists only in another tenant.
        """
        return self.adapters.resolve(tenant, name, version=version, alias=alias)

    def list_adapters(
        self,
        tenant: str,
        page_size: int = 0,
        page_token: str = "",
        kind: AdapterKindName | None = None,
        base_model: str | None = None,
    ) -> tuple[list[AdapterSummary], str]:
        """One page of the tenant's adapter names (sorted) and the next page token ("" at end)."""
        return self.adapters.list_adapters(tenant, page_size, page_token, kind=kind, base_model=base_model)

    def list_versions(
        self, tenant: str, name: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AdapterManifest], str]:
        """One page of an adapter's versions, oldest first; AdapterNotFound for unknown names."""
        return self.adapters.list_versions(tenant, name, page_size, page_token)

    def adapter_summary(self, tenant: str, name: str) -> AdapterSummary:
        """Latest version, aliases and timestamps of one adapter name; AdapterNotFound if none."""
        return self.adapters.summary(tenant, name)

    def get_aliases(self, tenant: str, name: str) -> dict[str, int]:
        """alias -> version for one adapter name."""
        return self.adapters.aliases(tenant, name)

    def set_alias(
        self, tenant: str, name: str, alias: str, version: int, expected_version: int | None = None
    ) -> int | None:
        """Point `alias` at `version`; returns the previous version (None if it was new).

        expected_version: compare-and-swap; the alias must currently point at it (0 = must
        not exist), else PreconditionConflict. With a CAS, a concurrent writer that wins
        the race also makes this call fail with PreconditionConflict.
        """
        return self.adapters.set_alias(tenant, name, alias, version, expected_version)

    def delete_alias(self, tenant: str, name: str, alias: str) -> None:
        """Remove an alias; NotFound when it does not exist."""
        self.adapters.delete_alias(tenant, name, alias)

    def delete_version(self, tenant: str, name: str, version: int) -> None:
        """Delete one version's manifest.

        Refused with FailedPrecondition while an alias points at it (move or delete the
        alias first), so an alias never silently dangles. The number is never reused.
        Blobs stay until garbage collection (see docs/architecture.md).
        """
        self.adapters.delete_version(tenant, name, version)

    def fetch_adapter_files(self, manifest: AdapterManifest, dest_dir: Path) -> dict[str, Path]:
        """Download every file of a version into dest_dir (verified); path -> local file."""
        return self.adapters.fetch_files(manifest, dest_dir)

    # --- datasets -------------------------------------------------------------------
    def put_dataset(self, tenant: str, name: str, images: Sequence[DatasetImageInput]) -> DatasetManifest:
        """Store images (filename, caption, bytes, width, height) as blobs, then the manifest."""
        return self.datasets.put(tenant, name, images)

    def get_dataset(self, tenant: str, dataset_id: str) -> DatasetManifest:
        return self.datasets.get(tenant, dataset_id)

    def list_datasets(self, tenant: str, page_size: int = 0, page_token: str = "") -> tuple[list[DatasetManifest], str]:
        return self.datasets.list_page(tenant, page_size, page_token)

    def fetch_dataset_images(self, manifest: DatasetManifest, dest_dir: Path) -> list[Path]:
        """Download every image (verified) in index order."""
        return self.datasets.fetch_images(manifest, dest_dir)

    # --- base models ----------------------------------------------------------------
    def import_base_model(self, name: str, folder: Path, description: str = "") -> BaseModelManifest:
        """Store a diffusers folder (safetensors weights + json/txt configs) as blobs.

        Returns the live version holding these exact bytes if there is one (idempotent),
        else creates the next version: a name is never re-pointed to other bytes.
        """
        return self.base_models.import_folder(name, folder, description)

    def get_base_model(self, ref: str) -> BaseModelManifest:
        """`name` (newest live version) or `name@N`; NotFound otherwise."""
        return self.base_models.get(ref)

    def base_model_versions(self, name: str) -> list[BaseModelManifest]:
        """Every live version of a base model name, oldest first."""
        return self.base_models.versions(name)

    def find_base_model_digest(self, name: str, digest: str) -> BaseModelManifest | None:
        """The live version of `name` with this digest (the one an adapter was trained on), if any."""
        return self.base_models.find_digest(name, digest)

    def list_base_models(self, page_size: int = 0, page_token: str = "") -> tuple[list[BaseModelManifest], str]:
        """One page of base-model names, each as its newest live version."""
        return self.base_models.list_page(page_size, page_token)

    def materialize_base_model(self, ref: str | BaseModelManifest, dest_root: Path) -> Path:
        """Download into dest_root/<digest>/ once (verified, atomic); from_pretrained-ready.

        Pass the manifest a caller already resolved so a concurrent import cannot swap the bytes.
        """
        return self.base_models.materialize(ref, dest_root)

    def delete_base_model(self, ref: str) -> list[BaseModelManifest]:
        """Delete `name@N`, or every live version of `name`; numbers are never reused."""
        return self.base_models.delete(ref)

    # --- checkpoints ----------------------------------------------------------------
    def put_checkpoint(self, tenant: str, job_id: str, step: int, files: Mapping[str, Path]) -> CheckpointManifest:
        return self.checkpoints.put(tenant, job_id, step, files)

    def latest_checkpoint(self, tenant: str, job_id: str) -> CheckpointManifest | None:
        return self.checkpoints.latest(tenant, job_id)

    def fetch_checkpoint(self, manifest: CheckpointManifest, dest_dir: Path) -> dict[str, Path]:
        return self.checkpoints.fetch(manifest, dest_dir)

    def delete_checkpoints(self, tenant: str, job_id: str) -> None:
        self.checkpoints.delete_all(tenant, job_id)
