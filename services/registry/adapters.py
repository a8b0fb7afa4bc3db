"""Adapter versions and aliases: immutable manifests, conditional-create allocation, CAS aliases.

Layout (under the registry prefix):
  adapters/<tenant>/<name>/versions/<n>.json   immutable, created with If-None-Match: *
  adapters/<tenant>/<name>/deleted/<n>.json    tombstone: a deleted number is never reused
  adapters/<tenant>/<name>/aliases/<a>.json    mutable pointer, replaced with If-Match
Every lookup is scoped to the caller's tenant key prefix, so another tenant's adapter is
indistinguishable from a missing one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

from services.common.errors import (
    AdapterNotFound,
    DataLoss,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PreconditionConflict,
)
from services.registry.allocation import VersionAllocator
from services.registry.blobs import Blobs
from services.registry.documents import checked_page_size, decode_token, encode_token, read_doc
from services.registry.files import download_files, reupload_missing, upload_files
from services.registry.keys import Keys, number_from_key
from services.registry.manifests import (
    ADAPTER_KINDS,
    AdapterKindName,
    AdapterManifest,
    AdapterSummary,
    AliasRecord,
    utc_now,
)
from services.registry.names import validate_alias, validate_name, validate_tenant, validate_version
from services.registry.refs import AdapterRef
from services.registry.store import ObjectNotFound, ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)

MAX_ALIAS_ATTEMPTS = 8


class Adapters:
    """Publish, resolve, list, alias and delete adapter versions."""

    def __init__(self, store: ObjectStore, keys: Keys, blobs: Blobs) -> None:
        self._store = store
        self._keys = keys
        self._blobs = blobs
        self._allocator = VersionAllocator(store, keys)

    # --- publish --------------------------------------------------------------------
    def publish(
        self,
        tenant: str,
        name: str,
        *,
        kind: AdapterKindName,
        base_model: str,
        base_model_digest: str = "",
        base_family: str = "",
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
        validate_tenant(tenant)
        validate_name(name, "name")
        validate_name(base_model, "base_model")
        if kind not in ADAPTER_KINDS:
            raise InvalidInput("kind", f"must be one of {', '.join(ADAPTER_KINDS)}")
        records = upload_files(self._blobs, files, "files")
        draft = AdapterManifest(
            tenant=tenant,
            name=name,
            version=1,
            kind=kind,
            base_model=base_model,
            base_model_digest=base_model_digest,
            base_family=base_family,
            files=records,
            trigger_tokens=list(trigger_tokens),
            training_config=dict(training_config or {}),
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            source_job_id=source_job_id,
            source_format=source_format,
            description=description,
        )
        manifest = self._allocator.publish(draft)
        reupload_missing(self._blobs, files, records)
        return manifest

    def job_version(self, tenant: str, name: str, job_id: str) -> AdapterManifest | None:
        """The version training job `job_id` published, by its publish marker; None if none yet.

        None also when the marker exists but its manifest does not (the publisher crashed
        between the two): the next publish of that job writes at the marker's number.
        """
        validate_tenant(tenant)
        validate_name(name, "name")
        marker = self._allocator.marker(tenant, name, job_id)
        if marker is None:
            return None
        try:
            return self._read_version(tenant, name, marker.version)
        except AdapterNotFound:
            return None

    # --- resolve --------------------------------------------------------------------
    def resolve(self, ref: AdapterRef) -> AdapterManifest:
        """The manifest `ref` names: by version, by alias, or (neither) the latest version.

        Unknown tenant/name/version/alias -> AdapterNotFound, identical for a name that
        exists only in another tenant.
        """
        validate_tenant(ref.tenant)
        validate_name(ref.name, "name")
        if ref.version is not None and ref.alias:
            raise InvalidInput("alias", "give either a version or an alias, not both")
        if ref.alias:
            version = self._alias_target(ref, validate_alias(ref.alias))
        elif ref.version is not None:
            version = validate_version(ref.version)
        else:
            last = _last(self._store.list_keys(self._keys.versions_prefix(ref.tenant, ref.name)))
            if last is None:
                raise AdapterNotFound(str(ref))
            version = number_from_key(last)
        return self._read_version(ref.tenant, ref.name, version, str(ref))

    def _alias_target(self, ref: AdapterRef, alias: str) -> int:
        try:
            record, _, _ = read_doc(self._store, self._keys.alias(ref.tenant, ref.name, alias), AliasRecord)
        except ObjectNotFound:
            raise AdapterNotFound(str(ref)) from None
        return record.version

    def _read_version(self, tenant: str, name: str, version: int, ref: str = "") -> AdapterManifest:
        """`ref`: how a miss names what was asked for (default: the version itself, name@N)."""
        key = self._keys.version(tenant, name, version)
        try:
            manifest, _, digest = read_doc(self._store, key, AdapterManifest)
        except ObjectNotFound:
            raise AdapterNotFound(ref or str(AdapterRef(tenant, name, version))) from None
        if (manifest.tenant, manifest.name, manifest.version) != (tenant, name, version):
            raise DataLoss(f"manifest at {key!r} names a different adapter")
        return manifest.model_copy(update={"manifest_digest": digest})

    # --- listing --------------------------------------------------------------------
    def list_adapters(
        self,
        tenant: str,
        page_size: int = 0,
        page_token: str = "",
        *,
        kind: AdapterKindName | None = None,
        base_model: str | None = None,
    ) -> tuple[list[AdapterSummary], str]:
        """One page of the tenant's adapter names (sorted) and the next page token ("" at end)."""
        validate_tenant(tenant)
        size = checked_page_size(page_size)
        scope = f"adapters:{kind or ''}:{base_model or ''}"
        after = decode_token(page_token, scope)
        root = self._keys.tenant_adapters(tenant)
        start = f"{root}{after}/~" if after else ""
        page: list[AdapterSummary] = []
        groups = self._name_groups(root, start)
        for name, keys in groups:
            summary = self._summary(tenant, name, keys)
            if summary is None or (kind and summary.kind != kind):
                continue
            if base_model and summary.base_model != base_model:
                continue
            page.append(summary)
            if len(page) == size:
                more = next(groups, None) is not None
                return page, encode_token(scope, name) if more else ""
        return page, ""

    def _name_groups(self, root: str, start_after: str) -> Iterator[tuple[str, list[str]]]:
        """(name, its keys) for each adapter name under the tenant, in key order."""
        keys = self._store.list_keys(root, start_after=start_after)
        for name, group in groupby(keys, key=lambda k: k[len(root) :].split("/", 1)[0]):
            yield name, list(group)

    def _summary(self, tenant: str, name: str, keys: list[str]) -> AdapterSummary | None:
        versions = [k for k in keys if k.startswith(self._keys.versions_prefix(tenant, name))]
        if not versions:
            return None  # every version deleted
        try:
            first, _, _ = read_doc(self._store, versions[0], AdapterManifest)
            latest = first
            if len(versions) > 1:
                latest, _, _ = read_doc(self._store, versions[-1], AdapterManifest)
        except ObjectNotFound:
            return None  # deleted while listing
        return AdapterSummary(
            tenant=tenant,
            name=name,
            kind=latest.kind,
            base_model=latest.base_model,
            latest_version=latest.version,
            aliases=self._read_aliases(tenant, name, keys),
            created_at=first.created_at,
            updated_at=latest.created_at,
        )

    def _read_aliases(self, tenant: str, name: str, keys: list[str]) -> dict[str, int]:
        prefix = self._keys.aliases_prefix(tenant, name)
        out: dict[str, int] = {}
        for key in keys:
            if key.startswith(prefix):
                try:
                    record, _, _ = read_doc(self._store, key, AliasRecord)
                except ObjectNotFound:
                    continue
                out[record.alias] = record.version
        return out

    def summary(self, tenant: str, name: str) -> AdapterSummary:
        """The listing entry of one adapter name; AdapterNotFound when it has no versions."""
        validate_tenant(tenant)
        validate_name(name, "name")
        keys = list(self._store.list_keys(self._keys.adapter_root(tenant, name)))
        found = self._summary(tenant, name, keys)
        if found is None:
            raise AdapterNotFound(name)
        return found

    def aliases(self, tenant: str, name: str) -> dict[str, int]:
        """alias -> version for one adapter name."""
        validate_tenant(tenant)
        validate_name(name, "name")
        keys = list(self._store.list_keys(self._keys.aliases_prefix(tenant, name)))
        return self._read_aliases(tenant, name, keys)

    def list_versions(
        self, tenant: str, name: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AdapterManifest], str]:
        """One page of an adapter's versions, oldest first; AdapterNotFound for unknown names."""
        validate_tenant(tenant)
        validate_name(name, "name")
        size = checked_page_size(page_size)
        scope = f"versions:{name}"
        after = decode_token(page_token, scope)
        prefix = self._keys.versions_prefix(tenant, name)
        start = self._keys.version(tenant, name, int(after)) if after else ""
        keys = self._store.list_keys(prefix, start_after=start)
        page: list[AdapterManifest] = []
        for key in keys:
            try:
                page.append(self._read_version(tenant, name, number_from_key(key), name))
            except AdapterNotFound:
                continue  # deleted while listing
            if len(page) == size:
                more = next(keys, None) is not None
                return page, encode_token(scope, str(page[-1].version)) if more else ""
        if not page and not after:
            raise AdapterNotFound(name)
        return page, ""

    # --- aliases --------------------------------------------------------------------
    def set_alias(
        self, tenant: str, name: str, alias: str, version: int, expected_version: int | None = None
    ) -> int | None:
        """Point `alias` at `version`; returns the previous version (None if it was new).

        expected_version: compare-and-swap; the alias must currently point at it (0 = must
        not exist), else PreconditionConflict. With a CAS, a concurrent writer that wins
        the race also makes this call fail with PreconditionConflict.
        """
        validate_tenant(tenant)
        validate_name(name, "name")
        validate_alias(alias)
        validate_version(version)
        if expected_version is not None and expected_version < 0:
            raise InvalidInput("expected_version", "must be 0 (alias must not exist) or a version")
        self._read_version(tenant, name, version)
        key = self._keys.alias(tenant, name, alias)
        record = AliasRecord(tenant=tenant, name=name, alias=alias, version=version)
        for _ in range(MAX_ALIAS_ATTEMPTS):
            previous, etag = self._current_alias(key)
            _check_expected(name, alias, previous, expected_version)
            try:
                data = record.model_copy(update={"updated_at": utc_now()}).to_json_bytes()
                if etag is None:
                    self._store.put_bytes(key, data, if_none_match=True)
                else:
                    self._store.put_bytes(key, data, if_match=etag)
                return previous
            except PreconditionFailed:
                if expected_version is not None:
                    raise _conflict(name, alias, "another writer changed it concurrently") from None
        raise _conflict(name, alias, "it kept changing concurrently; retry")

    def _current_alias(self, key: str) -> tuple[int | None, str | None]:
        try:
            record, etag, _ = read_doc(self._store, key, AliasRecord)
        except ObjectNotFound:
            return None, None
        return record.version, etag

    def delete_alias(self, tenant: str, name: str, alias: str) -> None:
        """Remove an alias; NotFound when it does not exist."""
        validate_tenant(tenant)
        validate_name(name, "name")
        validate_alias(alias)
        key = self._keys.alias(tenant, name, alias)
        if not self._store.exists(key):
            raise NotFound("alias", str(AdapterRef(tenant, name, alias=alias)))
        self._store.delete(key)

    # --- delete ---------------------------------------------------------------------
    def delete_version(self, tenant: str, name: str, version: int) -> None:
        """Delete one version's manifest.

        Refused with FailedPrecondition while an alias points at it (move or delete the
        alias first), so an alias never silently dangles. The number is never reused.
        Blobs stay until garbage collection (see docs/architecture.md).
        """
        validate_tenant(tenant)
        validate_name(name, "name")
        validate_version(version)
        manifest = self._read_version(tenant, name, version)
        pointing = sorted(a for a, v in self.aliases(tenant, name).items() if v == version)
        if pointing:
            raise FailedPrecondition(
                f"version {version} of adapter {name!r} is the target of alias(es) "
                f"{', '.join(pointing)}; move or delete them first",
                "version",
            )
        tombstone = {"version": version, "deleted_at": utc_now().isoformat(), "manifest": manifest.manifest_digest}
        self._store.put_bytes(self._keys.tombstone(tenant, name, version), json.dumps(tombstone).encode())
        self._store.delete(self._keys.version(tenant, name, version))

    # --- files ----------------------------------------------------------------------
    def fetch_files(self, manifest: AdapterManifest, dest_dir: Path) -> dict[str, Path]:
        """Download every file of a version into dest_dir (verified); path -> local file."""
        return download_files(self._blobs, manifest.files, dest_dir)


def _check_expected(name: str, alias: str, current: int | None, expected: int | None) -> None:
    if expected is None:
        return
    if expected == 0 and current is not None:
        raise _conflict(name, alias, f"expected it not to exist, but it points at version {current}")
    if expected != 0 and current != expected:
        now = f"points at version {current}" if current is not None else "does not exist"
        raise _conflict(name, alias, f"expected version {expected}, but it {now}")


def _conflict(name: str, alias: str, why: str) -> FailedPrecondition:
    return PreconditionConflict(f"alias {alias!r} of adapter {name!r} was not changed: {why}", "expected_version")


def _last(keys: Iterator[str]) -> str | None:
    last = None
    for last in keys:  # noqa: B007 - we want the final key of the sorted listing
        pass
    return last
