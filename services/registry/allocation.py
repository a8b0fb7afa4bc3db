"""Version numbers: claimed by conditional create, and exactly one per training job.

Every publish first *claims* a number, `adapters/<t>/<n>/claims/<v>.json`, with
If-None-Match (v = max(versions, tombstones, claims) + 1; a lost race tries v + 1), and only
then writes `versions/<v>.json`. Only the claimant ever writes that manifest, so a claimed
number cannot be taken by anyone else.

A publish on behalf of a training job adds a per-job *marker*,
`adapters/<t>/<n>/jobs/<job_id>.json`, also created with If-None-Match, holding the number
the job claimed. The marker decides the job's version once and for all: a second publisher
of the same job (a lease takeover, a retry after SIGKILL, a stalled worker waking up) reads
the marker and writes at that number, and whoever loses that If-None-Match reads the
manifest that won and adopts it. So every interleaving of two publishers of one job yields
one manifest (the argument is written out in docs/architecture.md, "Exactly-once publish").
A claim that lost the marker race stays an unused number (a gap, like a deleted version).
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime

from pydantic import Field

from services.common.errors import DataLoss, FailedPrecondition, Unavailable
from services.registry.documents import put_if_absent, read_doc
from services.registry.keys import Keys, number_from_key
from services.registry.manifests import AdapterManifest, _Doc, utc_now
from services.registry.store import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

MAX_CLAIM_ATTEMPTS = 256


class VersionClaim(_Doc):
    """claims/<v>.json: this number is taken (by `job_id` when a job claimed it)."""

    version: int
    job_id: str = ""
    claimed_at: datetime = Field(default_factory=utc_now)


class PublishMarker(_Doc):
    """jobs/<job_id>.json: the one version training job `job_id` publishes."""

    job_id: str
    version: int
    created_at: datetime = Field(default_factory=utc_now)


class VersionAllocator:
    """Claims numbers and writes version manifests; idempotent per source job."""

    def __init__(self, store: ObjectStore, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    def publish(self, draft: AdapterManifest) -> AdapterManifest:
        """Store `draft` as a new version (or, for a job that already has one, adopt it)."""
        if draft.source_job_id:
            return self._publish_for_job(draft, self._job_version(draft))
        for _ in range(MAX_CLAIM_ATTEMPTS):
            version = self._claim(draft.tenant, draft.name, "")
            try:
                return self._write(draft, version)
            except PreconditionFailed:  # written without a claim by an older release
                continue
        raise Unavailable(f"could not allocate a version of {draft.name!r}: too many concurrent publishers")

    def marker(self, tenant: str, name: str, job_id: str) -> PublishMarker | None:
        """The job's publish marker, if a publisher of that job got as far as creating it."""
        try:
            marker, _, _ = read_doc(self._store, self._keys.job_marker(tenant, name, job_id), PublishMarker)
        except ObjectNotFound:
            return None
        return marker

    def highest(self, tenant: str, name: str) -> int:
        """Largest number ever used or claimed (versions, tombstones, claims)."""
        highest = 0
        for prefix in (self._keys.versions_prefix(tenant, name), self._keys.tombstones_prefix(tenant, name),
                       self._keys.claims_prefix(tenant, name)):
            last = None
            for last in self._store.list_keys(prefix):  # noqa: B007 - the sorted listing's last key
                pass
            if last:
                highest = max(highest, number_from_key(last))
        return highest

    # --- internals ------------------------------------------------------------------
    def _claim(self, tenant: str, name: str, job_id: str) -> int:
        version = self.highest(tenant, name) + 1
        for _ in range(MAX_CLAIM_ATTEMPTS):
            claim = VersionClaim(version=version, job_id=job_id)
            if put_if_absent(self._store, self._keys.claim(tenant, name, version), claim.to_json_bytes()):
                return version
            log.info("version %s of %s claimed concurrently; trying the next", version, name)
            version += 1
        raise Unavailable(f"could not claim a version of {name!r}: too many concurrent publishers")

    def _job_version(self, draft: AdapterManifest) -> int:
        """The marker's number; the first publisher of the job creates the marker."""
        tenant, name, job_id = draft.tenant, draft.name, draft.source_job_id
        found = self.marker(tenant, name, job_id)
        if found is not None:
            return found.version
        version = self._claim(tenant, name, job_id)
        marker = PublishMarker(job_id=job_id, version=version)
        if put_if_absent(self._store, self._keys.job_marker(tenant, name, job_id), marker.to_json_bytes()):
            return version
        winner = self.marker(tenant, name, job_id)
        if winner is None:  # markers are never deleted; a vanished one is damage
            raise DataLoss(f"publish marker of job {job_id!r} disappeared")
        log.info("job %s already claimed version %s; number %s stays unused", job_id, winner.version, version)
        return winner.version

    def _publish_for_job(self, draft: AdapterManifest, version: int) -> AdapterManifest:
        tenant, name, job_id = draft.tenant, draft.name, draft.source_job_id
        if self._store.exists(self._keys.tombstone(tenant, name, version)):
            raise FailedPrecondition(
                f"version {version} of adapter {name!r}, published by job {job_id!r}, was deleted", "source_job_id")
        try:
            return self._write(draft, version)
        except PreconditionFailed:
            pass
        key = self._keys.version(tenant, name, version)
        existing, _, digest = read_doc(self._store, key, AdapterManifest)
        if existing.source_job_id != job_id:
            raise DataLoss(f"version {version} of {name!r} is claimed by job {job_id!r} "
                           f"but holds job {existing.source_job_id!r}'s output")
        log.info("adopted version %s of %s written by another publisher of job %s", version, name, job_id)
        return existing.model_copy(update={"manifest_digest": digest})

    def _write(self, draft: AdapterManifest, version: int) -> AdapterManifest:
        manifest = draft.model_copy(update={"version": version, "created_at": utc_now()})
        data = manifest.to_json_bytes()
        self._store.put_bytes(self._keys.version(draft.tenant, draft.name, version), data, if_none_match=True)
        return manifest.model_copy(update={"manifest_digest": hashlib.sha256(data).hexdigest()})
