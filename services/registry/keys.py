"""Where each registry document lives in the object store (the layout in DESIGN.md).

Version and step numbers are zero-padded so that the store's sorted listing is numeric
order: the newest version is the last key, and pagination is a plain `start_after`.
"""

from __future__ import annotations

from dataclasses import dataclass

VERSION_DIGITS = 10


@dataclass(frozen=True)
class Keys:
    """Builds object keys under an optional prefix (e.g. one registry per test)."""

    prefix: str = ""

    def _p(self, rest: str) -> str:
        return f"{self.prefix.strip('/')}/{rest}" if self.prefix.strip("/") else rest

    # blobs
    def blob(self, sha256: str) -> str:
        return self._p(f"blobs/sha256/{sha256}")

    def blobs_prefix(self) -> str:
        return self._p("blobs/sha256/")

    # adapters
    def tenant_adapters(self, tenant: str) -> str:
        return self._p(f"adapters/{tenant}/")

    def adapter_root(self, tenant: str, name: str) -> str:
        return self._p(f"adapters/{tenant}/{name}/")

    def versions_prefix(self, tenant: str, name: str) -> str:
        return self.adapter_root(tenant, name) + "versions/"

    def version(self, tenant: str, name: str, version: int) -> str:
        return self.versions_prefix(tenant, name) + f"{version:0{VERSION_DIGITS}d}.json"

    def tombstones_prefix(self, tenant: str, name: str) -> str:
        return self.adapter_root(tenant, name) + "deleted/"

    def tombstone(self, tenant: str, name: str, version: int) -> str:
        return self.tombstones_prefix(tenant, name) + f"{version:0{VERSION_DIGITS}d}.json"

    def claims_prefix(self, tenant: str, name: str) -> str:
        return self.adapter_root(tenant, name) + "claims/"

    def claim(self, tenant: str, name: str, version: int) -> str:
        return self.claims_prefix(tenant, name) + f"{version:0{VERSION_DIGITS}d}.json"

    def job_marker(self, tenant: str, name: str, job_id: str) -> str:
        return self.adapter_root(tenant, name) + f"jobs/{job_id}.json"

    def adapters_prefix(self) -> str:
        return self._p("adapters/")

    def is_adapter_version(self, key: str) -> bool:
        """True for a `version(...)` key, judged by position (an adapter may be named "versions")."""
        prefix = self.adapters_prefix()
        parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
        return len(parts) == 4 and parts[2] == "versions" and parts[3].endswith(".json")

    def datasets_root(self) -> str:
        return self._p("datasets/")

    def checkpoints_root(self) -> str:
        return self._p("checkpoints/")

    def aliases_prefix(self, tenant: str, name: str) -> str:
        return self.adapter_root(tenant, name) + "aliases/"

    def alias(self, tenant: str, name: str, alias: str) -> str:
        return self.aliases_prefix(tenant, name) + f"{alias}.json"

    # base models, datasets, checkpoints
    def base_models_prefix(self) -> str:
        return self._p("base-models/")

    def base_model(self, name: str) -> str:
        """The pre-versioning single manifest; read as version 1 when present (never written)."""
        return self._p(f"base-models/{name}/manifest.json")

    def base_model_root(self, name: str) -> str:
        return self._p(f"base-models/{name}/")

    def base_model_versions_prefix(self, name: str) -> str:
        return self.base_model_root(name) + "versions/"

    def base_model_version(self, name: str, version: int) -> str:
        return self.base_model_versions_prefix(name) + f"{version:0{VERSION_DIGITS}d}.json"

    def base_model_tombstones_prefix(self, name: str) -> str:
        return self.base_model_root(name) + "deleted/"

    def base_model_tombstone(self, name: str, version: int) -> str:
        return self.base_model_tombstones_prefix(name) + f"{version:0{VERSION_DIGITS}d}.json"

    def datasets_prefix(self, tenant: str) -> str:
        return self._p(f"datasets/{tenant}/")

    def dataset(self, tenant: str, dataset_id: str) -> str:
        return self.datasets_prefix(tenant) + f"{dataset_id}.json"

    def checkpoints_prefix(self, tenant: str, job_id: str) -> str:
        return self._p(f"checkpoints/{tenant}/{job_id}/")

    def checkpoint(self, tenant: str, job_id: str, step: int) -> str:
        return self.checkpoints_prefix(tenant, job_id) + f"{step:0{VERSION_DIGITS}d}.json"


def number_from_key(key: str) -> int:
    """The version/step number of a `.../<n>.json` key."""
    return int(key.rsplit("/", 1)[-1].removesuffix(".json"))
