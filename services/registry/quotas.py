"""The per-tenant stored-bytes quota (0 = unlimited), checked before an upload is stored.

It lives with the registry because the registry measures what a tenant stores and both
RegistryService (ImportAdapter) and TrainingService (UploadDataset, CreateTrainingJob) refuse
over it. Every refusal is QuotaExceeded: RESOURCE_EXHAUSTED + QuotaFailure + RetryInfo.
"""

from __future__ import annotations

from services.common.errors import QuotaExceeded
from services.registry.registry import Registry

# Freed storage needs the tenant to delete something, so a retry soon is pointless.
STORAGE_RETRY_SECONDS = 300.0


def check_stored_bytes(registry: Registry, limit: int, tenant: str, new_bytes: int) -> None:
    """Refuse `new_bytes` more for `tenant` when they would take it over `limit`."""
    if limit <= 0:
        return
    used = registry.stored_bytes(tenant)
    if used + new_bytes > limit:
        raise QuotaExceeded(tenant, f"stored bytes: {used} used + {new_bytes} new exceeds the limit of {limit}; "
                            "delete adapter versions or datasets", STORAGE_RETRY_SECONDS)
