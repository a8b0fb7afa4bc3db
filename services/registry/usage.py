"""How many registry bytes a tenant stores, for the `quota_stored_bytes` quota.

Computed from the manifests on demand rather than kept in a per-tenant usage document: a
counter document would have to be updated (compare-and-swap) by every publish, upload and
delete in every process and would drift after any crash between the write and the update,
while the manifests are the truth and are immutable. The cost is one LIST per prefix plus one
GET per adapter version and dataset, paid only by the calls that add bytes (UploadDataset,
CreateTrainingJob) and only when the quota is set.

Usage counts *logical* bytes: the sizes the tenant's version manifests and datasets name.
Blobs are content-addressed and shared, so two versions with the same file count twice, and
checkpoints (transient, deleted when their job ends) and shared base models do not count.
"""

from __future__ import annotations

from services.registry.documents import read_doc
from services.registry.keys import Keys
from services.registry.manifests import AdapterManifest, DatasetManifest
from services.registry.names import validate_tenant
from services.registry.store import ObjectNotFound, ObjectStore


def tenant_stored_bytes(store: ObjectStore, keys: Keys, tenant: str) -> int:
    """Sum of the file sizes of the tenant's adapter versions plus its datasets' bytes."""
    validate_tenant(tenant)
    total = 0
    for key in store.list_keys(keys.tenant_adapters(tenant)):
        if not keys.is_adapter_version(key):
            continue  # aliases and tombstones name no bytes
        try:
            total += read_doc(store, key, AdapterManifest)[0].size_bytes
        except ObjectNotFound:
            continue  # deleted while listing
    for key in store.list_keys(keys.datasets_prefix(tenant)):
        try:
            total += read_doc(store, key, DatasetManifest)[0].total_bytes
        except ObjectNotFound:
            continue
    return total
