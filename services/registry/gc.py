"""Blob garbage collection: mark from every manifest, sweep unreferenced blobs past a grace.

Nothing in the request path deletes blobs (they are shared by content, and a publisher
uploads them before its manifest exists), so deleted versions, datasets, checkpoints and
base models leave blobs behind. `collect_garbage` reclaims them:

1. list every blob with its last-modified time (before marking, so a blob uploaded later
   is not in the candidate set at all);
2. mark: read every live manifest (adapter versions, base-model versions, datasets,
   checkpoints) and collect the digests they name. Tombstoned adapter versions are not
   marked (deleting a version frees its bytes); publish markers and claims name no blobs.
   A manifest that does not parse aborts the run before anything is deleted: what it
   references is unknown;
3. sweep: a candidate that no manifest names and whose last-modified time is older than
   `grace_seconds` is re-checked (`stat`, so a blob a publisher touched meanwhile is kept)
   and deleted.

Why a concurrent publish loses nothing: a publisher uploads new blobs (young, so kept by
the grace period) or touches blobs it reuses (young again, so the re-check keeps them),
writes its manifest, then re-uploads any of its blobs that a collector deleted in the
instant between that collector's re-check and its delete (`files.reupload_missing`).
Every collection that starts after the manifest exists marks its blobs.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pydantic import BaseModel

from services.common.background import DaemonThread
from services.registry.documents import read_doc
from services.registry.manifests import AdapterManifest, BaseModelManifest, CheckpointManifest, DatasetManifest
from services.registry.registry import Registry
from services.registry.store import ObjectInfo, ObjectNotFound

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What one collection found and deleted (or, in a dry run, would delete)."""

    dry_run: bool
    grace_seconds: float
    blobs: int = 0
    referenced: int = 0
    kept_young: int = 0
    manifests: int = 0
    deleted: list[ObjectInfo] = field(default_factory=list)

    @property
    def deleted_bytes(self) -> int:
        return sum(info.size for info in self.deleted)

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        return (f"{self.blobs} blobs, {self.referenced} referenced by {self.manifests} manifests, "
                f"{self.kept_young} unreferenced but younger than {self.grace_seconds:g} s; "
                f"{verb} {len(self.deleted)} blobs ({self.deleted_bytes} bytes)")


def collect_garbage(registry: Registry, *, grace_seconds: float, dry_run: bool = False,
                    clock: Callable[[], float] = time.time) -> GcReport:
    """One mark-and-sweep over the registry's blobs (see the module docstring)."""
    store, keys = registry.store, registry.keys
    cutoff = clock() - grace_seconds
    report = GcReport(dry_run=dry_run, grace_seconds=grace_seconds)
    candidates = list(store.list_objects(keys.blobs_prefix()))
    report.blobs = len(candidates)
    referenced = _mark(registry, report)
    for info in candidates:
        if _digest(info.key) in referenced:
            report.referenced += 1
        elif info.last_modified > cutoff or not _still_old(registry, info, cutoff):
            report.kept_young += 1
        else:
            if not dry_run:
                store.delete(info.key)
            report.deleted.append(info)
    log.info("blob gc: %s", report.summary())
    return report


def _digest(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _still_old(registry: Registry, info: ObjectInfo, cutoff: float) -> bool:
    """Re-read the blob's time right before deleting it: a publisher may have touched it."""
    try:
        return registry.store.stat(info.key).last_modified <= cutoff
    except ObjectNotFound:
        return False  # gone already


def _mark(registry: Registry, report: GcReport) -> set[str]:
    keys = registry.keys
    # Which keys under each prefix are manifests, judged by position in the layout (an adapter
    # may be *named* "versions"): <tenant>/<name>/versions/<n>.json, <name>/versions/<n>.json
    # or the legacy <name>/manifest.json, <tenant>/<id>.json, <tenant>/<job>/<step>.json.
    sources: list[tuple[str, Callable[[list[str]], bool], type[BaseModel]]] = [
        (keys.adapters_prefix(), lambda p: len(p) == 4 and p[2] == "versions", AdapterManifest),
        (keys.base_models_prefix(), lambda p: (len(p) == 3 and p[1] == "versions") or p[1:] == ["manifest.json"],
         BaseModelManifest),
        (keys.datasets_root(), lambda p: len(p) == 2, DatasetManifest),
        (keys.checkpoints_root(), lambda p: len(p) == 3, CheckpointManifest),
    ]
    referenced: set[str] = set()
    for prefix, wanted, model in sources:
        for doc in _documents(registry, prefix, wanted, model):
            report.manifests += 1
            referenced.update(_digests(doc))
    return referenced


def _documents(registry: Registry, prefix: str, wanted: Callable[[list[str]], bool],
               model: type[BaseModel]) -> Iterator[BaseModel]:
    for key in registry.store.list_keys(prefix):
        if not wanted(key[len(prefix):].split("/")):
            continue
        try:
            doc, _, _ = read_doc(registry.store, key, model)  # DataLoss aborts the whole run
        except ObjectNotFound:
            continue  # deleted while listing
        yield doc


def _digests(doc: BaseModel) -> Iterable[str]:
    if isinstance(doc, DatasetManifest):
        return (image.sha256 for image in doc.images)
    files = getattr(doc, "files", [])
    return (record.sha256 for record in files)


class PeriodicCollector:
    """Runs `collect_garbage` every `interval` seconds (±10 % jitter) in a daemon thread.

    The first run waits one interval, so process start-up (and short tests) never pay for a
    full listing. Several processes collecting at once is safe, only wasteful; the jitter
    spreads workers that started together. A failed run is logged and retried next time.
    """

    def __init__(self, registry: Registry, *, interval: float, grace_seconds: float) -> None:
        self._registry = registry
        self._interval = interval
        self._grace = grace_seconds
        self._thread = DaemonThread("registry-gc", self._run)
        self.runs = 0

    @property
    def started(self) -> bool:
        return self._thread.started

    def start(self) -> PeriodicCollector:
        if self._interval > 0:
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._thread.close(timeout)

    def _run(self) -> None:
        while not self._thread.stop.wait(self._interval * random.uniform(0.9, 1.1)):
            try:
                collect_garbage(self._registry, grace_seconds=self._grace)
            except Exception:
                log.exception("blob gc failed; retrying at the next interval")
            self.runs += 1
