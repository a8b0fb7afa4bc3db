"""The `Registry` facade: adapters, datasets, base models, checkpoints and blobs in one store.

Everything is synchronous (boto3 is); servicers call it through `asyncio.to_thread`. The
work lives in one module per resource (blobs, adapters, datasets, base_models,
checkpoints); this class only wires them to one store and key prefix, so callers have a
single object to inject; callers use the resources directly (`registry.adapters.publish`,
`registry.base_models.get`), there are no forwarding methods. Errors are the typed errors
of services.common.errors: InvalidInput for bad names, NotFound/AdapterNotFound (never
revealing other tenants), PreconditionConflict for lost compare-and-swaps, DataLoss when
stored bytes do not match their digest, Unavailable (StoreUnavailable) when the store
cannot be reached.
"""

from __future__ import annotations

from services.common.config import Settings
from services.registry.adapters import Adapters
from services.registry.base_models import BaseModels
from services.registry.blobs import Blobs
from services.registry.checkpoints import Checkpoints
from services.registry.datasets import Datasets
from services.registry.keys import Keys
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
