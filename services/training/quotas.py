"""Per-tenant training quotas: queued jobs, concurrent jobs and stored bytes (0 = unlimited).

* Queued jobs: CreateTrainingJob refuses a tenant that already has `quota_queued_jobs` jobs
  QUEUED (counted in SQL inside the insert's transaction, under a per-tenant lock, `leases.lock_tenant`).
* Concurrent jobs: enforced by the claim (`LeaseOps.claim`), which skips the jobs of a tenant
  that already has `quota_concurrent_jobs` RUNNING: they wait in the queue, never dropped.
* Stored bytes (services/registry/quotas.py): UploadDataset and ImportAdapter refuse an
  upload that would take the tenant over `quota_stored_bytes`; CreateTrainingJob refuses while
  the tenant is at or over it (a job's output size is unknown until it is trained, so one job
  may overshoot; a finished training is never thrown away for the quota).
Every refusal is QuotaExceeded: RESOURCE_EXHAUSTED + QuotaFailure + RetryInfo.
"""

from __future__ import annotations

from services.common.config import Settings
from services.common.errors import QuotaExceeded
from services.registry.quotas import STORAGE_RETRY_SECONDS, check_stored_bytes
from services.registry.registry import Registry

# RetryInfo delay: a queued job usually starts within tens of seconds.
QUEUED_RETRY_SECONDS = 30.0


def check_upload_bytes(registry: Registry, settings: Settings, tenant: str, new_bytes: int) -> None:
    """Refuse an upload of `new_bytes` that would exceed the tenant's stored-bytes quota."""
    check_stored_bytes(registry, settings.quota_stored_bytes, tenant, new_bytes)


def check_room_for_job(registry: Registry, settings: Settings, tenant: str) -> None:
    """Refuse a new training job while the tenant's stored bytes are at or over the quota."""
    limit = settings.quota_stored_bytes
    if limit <= 0:
        return
    used = registry.stored_bytes(tenant)
    if used >= limit:
        raise QuotaExceeded(tenant, f"stored bytes: {used} used of a limit of {limit}; a job would publish more; "
                            "delete adapter versions or datasets", STORAGE_RETRY_SECONDS)
