"""From an adapter reference to a parsed payload in RAM: resolution, disk tier, host tier.

* Resolution: a pinned version is immutable, so its manifest is cached for good; an alias or
  "latest" is re-read after `ttl` seconds. When the store is unreachable a previously resolved
  reference keeps its last manifest (stale but consistent), so adapters already cached keep
  working through a registry outage; anything else gets UNAVAILABLE with RetryInfo.
* Disk tier: blobs by sha256 under `<cache_dir>/blobs/sha256/<hex>`, downloaded through the
  registry (which verifies the digest while streaming: a corrupted blob raises DataLoss and
  leaves nothing behind). Files found on disk at start-up are re-verified before first use.
* Host tier: the parsed payload (LoRA state dict, TI vectors) keyed by adapter version.
Every lookup names the tenant whose request it serves (the manifest's), so GetCacheStatus
can show each tenant only the entries it used itself (see cache.py).
All three are thread-safe and single-flight; callers run them off the event loop.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from services.common.config import Settings
from services.common.errors import AtelierError, DataLoss, NotFound, Unavailable
from services.inference.cache import ByteLRU, CapacityError
from services.inference.metrics import InferenceMetrics
from services.inference.payloads import (
    DreamBoothPayload,
    Payload,
    dreambooth_payload,
    lora_payload,
    ti_payload,
)
from services.registry.blobs import sha256_file
from services.registry.manifests import AdapterManifest, FileRecord
from services.registry.refs import AdapterRef
from services.registry.registry import Registry

RESOLVED_CACHE_ENTRIES = 4096


@dataclass(frozen=True)
class AdapterKey:
    """A resolved (pinned) reference: one adapter version, the key of every cache tier.

    The parsed form is services.registry.refs.AdapterRef; `of(manifest)` is the only way from
    a resolution to a key (the manifest digest guards reuse of a number).
    """

    tenant: str
    name: str
    version: int
    digest: str

    @classmethod
    def of(cls, manifest: AdapterManifest) -> AdapterKey:
        return cls(manifest.tenant, manifest.name, manifest.version, manifest.manifest_digest)

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}@{self.version}"


@dataclass
class _Resolved:
    manifest: AdapterManifest
    at: float


class Resolver:
    """Adapter references -> manifests, with the caching rules of the module docstring."""

    def __init__(self, registry: Registry, ttl_seconds: float) -> None:
        self._registry = registry
        self._ttl = ttl_seconds
        self._lock = threading.Lock()
        self._cache: OrderedDict[AdapterRef, _Resolved] = OrderedDict()

    def resolve(self, ref: AdapterRef) -> AdapterManifest:
        with self._lock:
            hit = self._cache.get(ref)
            if hit is not None:
                self._cache.move_to_end(ref)
        if hit is not None and (ref.pinned or time.monotonic() - hit.at < self._ttl):
            return hit.manifest
        try:
            manifest = self._registry.adapters.resolve(ref)
        except Unavailable:
            if hit is not None:
                return hit.manifest
            raise
        with self._lock:
            self._cache[ref] = _Resolved(manifest, time.monotonic())
            while len(self._cache) > RESOLVED_CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return manifest

    def moved_aliases(self) -> list[tuple[AdapterManifest, AdapterManifest]]:
        """Re-resolve every cached alias reference now; (old, new) manifests of those that moved.
        A reference that cannot be resolved (outage, alias deleted) keeps its last manifest."""
        with self._lock:
            refs = [(ref, hit) for ref, hit in self._cache.items() if ref.alias]
        moved = []
        for ref, hit in refs:
            try:
                manifest = self._registry.adapters.resolve(ref)
            except AtelierError:
                continue
            with self._lock:
                if ref in self._cache:
                    self._cache[ref] = _Resolved(manifest, time.monotonic())
            if manifest.version != hit.manifest.version:
                moved.append((hit.manifest, manifest))
        return moved


@dataclass
class DiskBlob:
    path: Path
    size: int
    verified: bool


class DiskTier:
    """Verified blobs on local disk, LRU-bounded in bytes; eviction deletes the file."""

    def __init__(self, root: Path, capacity_bytes: int, registry: Registry, metrics: InferenceMetrics) -> None:
        self.root = root / "blobs" / "sha256"
        self.root.mkdir(parents=True, exist_ok=True)
        self._registry = registry
        self.cache: ByteLRU[str, DiskBlob] = ByteLRU(
            "disk", capacity_bytes, lambda b: b.size, on_evict=lambda _k, b: b.path.unlink(missing_ok=True),
            strict=True, metrics=metrics.tier("disk"),
        )
        self._rehydrate()

    def _rehydrate(self) -> None:
        """Adopt files a previous process left (oldest first), unverified until first use."""
        files = sorted((p for p in self.root.iterdir() if p.is_file() and len(p.name) == 64),
                       key=lambda p: p.stat().st_mtime)
        for path in files:
            with contextlib.suppress(CapacityError):
                if not self.cache.put(path.name, DiskBlob(path, path.stat().st_size, verified=False)):
                    path.unlink(missing_ok=True)
        for stray in self.root.glob(".*.part"):
            stray.unlink(missing_ok=True)

    def fetch(self, record: FileRecord, tenant: str | None = None) -> Path:
        """A verified local file with the record's content (downloaded once per digest)."""
        blob = self.cache.get_or_load(record.sha256, lambda: self._download(record), user=tenant)
        if not blob.verified:
            digest, size = sha256_file(blob.path) if blob.path.exists() else ("", -1)
            if digest != record.sha256 or size != record.size:
                self.cache.evict(record.sha256)
                blob = self.cache.get_or_load(record.sha256, lambda: self._download(record), user=tenant)
            blob.verified = True
        return blob.path

    def _download(self, record: FileRecord) -> DiskBlob:
        dest = self.root / record.sha256
        try:
            self._registry.blobs.download(record.sha256, dest)
        except NotFound:
            raise DataLoss(f"blob {record.sha256} of {record.path!r} is missing from the registry") from None
        size = dest.stat().st_size
        if size != record.size:
            dest.unlink(missing_ok=True)
            raise DataLoss(f"file {record.path!r}: {size} bytes, its manifest says {record.size}")
        return DiskBlob(dest, size, verified=True)


class HostTier:
    """Parsed payloads in RAM, keyed by adapter version; loads go through the disk tier."""

    def __init__(self, capacity_bytes: int, disk: DiskTier, metrics: InferenceMetrics) -> None:
        self._disk = disk
        self.cache: ByteLRU[AdapterKey, Payload] = ByteLRU(
            "host", capacity_bytes, lambda p: p.nbytes, metrics=metrics.tier("host"))

    def load(self, manifest: AdapterManifest) -> Payload:
        return self.cache.get_or_load(AdapterKey.of(manifest), lambda: self._parse(manifest),
                                      user=manifest.tenant)

    def cached(self, manifest: AdapterManifest) -> Payload | None:
        """The payload if resident (no thread hop); records the tenant's use, not recency."""
        key = AdapterKey.of(manifest)
        payload = self.cache.peek(key)
        if payload is not None:
            self.cache.touch(key, manifest.tenant)
        return payload

    def _parse(self, manifest: AdapterManifest) -> Payload:
        if manifest.kind == "DREAMBOOTH":
            for record in manifest.files:
                self._disk.fetch(record, manifest.tenant)
            return dreambooth_payload(manifest)
        try:
            local = self._local_files(manifest)
            return self._parse_files(manifest, local)
        except FileNotFoundError:
            # The disk tier evicted a file between fetch and read: fetch once more.
            return self._parse_files(manifest, self._local_files(manifest))

    @staticmethod
    def _parse_files(manifest: AdapterManifest, local: dict[str, Path]) -> Payload:
        if manifest.kind == "LORA":
            return lora_payload(manifest, local)
        return ti_payload(manifest, local)

    def _local_files(self, manifest: AdapterManifest) -> dict[str, Path]:
        return {f.path: self._disk.fetch(f, manifest.tenant) for f in manifest.files
                if f.path.endswith(".safetensors")}

    def dreambooth_files(self, payload: DreamBoothPayload, tenant: str) -> dict[str, Path]:
        """Local paths of a DreamBooth adapter's files (re-fetched if the disk tier dropped them)."""
        return {f.path: self._disk.fetch(f, tenant) for f in payload.files}


def open_adapter_tiers(settings: Settings, registry: Registry,
                       metrics: InferenceMetrics) -> tuple[DiskTier, HostTier]:
    disk = DiskTier(Path(settings.cache_dir), settings.disk_cache_bytes, registry, metrics)
    return disk, HostTier(settings.host_cache_bytes, disk, metrics)
