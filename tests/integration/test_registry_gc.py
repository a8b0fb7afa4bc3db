"""Blob garbage collection on the local store and on S3 (moto): what is kept, what goes, races.

"Old" is produced without sleeping: the collector takes a clock, and a clock 10 000 s ahead
with a 3 600 s grace makes every blob written by the test older than the grace period.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common.config import Settings
from services.common.errors import DataLoss
from services.registry.gc import PeriodicCollector, collect_garbage
from services.registry.manifests import LORA_WEIGHTS_FILE, AdapterManifest
from services.registry.registry import Registry
from services.registry.store import ObjectStore, open_store
from tests.fixtures.s3 import write_fake_pipeline, write_lora

GRACE = 3600.0
REAL_GRACE = 1.2  # > 1 s: S3 Last-Modified has one-second resolution
RACE_GRACE = 4.0  # free-running race: the premise "no publish outlasts the grace" must hold on a busy machine


def ahead() -> float:
    return time.time() + 10_000.0


class PausingStore:
    """Delegates to a real store; `pause[method]` runs once, in the calling thread, before that call."""

    def __init__(self, inner: ObjectStore) -> None:
        self._inner = inner
        self.pause: dict[str, Callable[[], None]] = {}
        self.only_thread: str = ""

    def _gate(self, method: str) -> None:
        if self.only_thread and threading.current_thread().name != self.only_thread:
            return
        gate = self.pause.pop(method, None)
        if gate is not None:
            gate()

    def list_keys(self, prefix: str, **kwargs: Any) -> Any:
        if "adapters/" in prefix:
            self._gate("mark")
        return self._inner.list_keys(prefix, **kwargs)

    def stat(self, key: str) -> Any:
        self._gate("stat")
        return self._inner.stat(key)

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        if "/claims/" in key:
            self._gate("claim")
        return self._inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _publish(registry: Registry, path: Path, name: str = "cat") -> AdapterManifest:
    return registry.adapters.publish("acme", name, kind="LORA", base_model="tiny", files={LORA_WEIGHTS_FILE: path})


def _blob_keys(registry: Registry) -> set[str]:
    return {k.rsplit("/", 1)[-1] for k in registry.store.list_keys(registry.keys.blobs_prefix())}


def _assert_complete(registry: Registry, manifest: AdapterManifest, out: Path) -> None:
    files = registry.adapters.fetch_files(manifest, out)  # verified download of every blob
    assert set(files) == {f.path for f in manifest.files}


def test_only_unreferenced_old_blobs_go_and_dry_run_deletes_nothing(registry_settings: Settings,
                                                                    tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    kept = _publish(registry, write_lora(tmp_path / "kept.safetensors", seed=1))
    doomed = _publish(registry, write_lora(tmp_path / "doomed.safetensors", seed=2))
    registry.adapters.delete_version("acme", "cat", doomed.version)  # tombstoned: its bytes are garbage
    dataset = registry.datasets.put("acme", "ds", [("a.png", "", b"png-bytes-a", 8, 8)])
    registry.checkpoints.put("acme", "job-1", 10, {"state.json": _text(tmp_path / "state.json", "{}")})
    base = registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "pipe"))
    orphan = registry.blobs.put_bytes(b"uploaded, manifest never written")
    before = _blob_keys(registry)

    dry = collect_garbage(registry, grace_seconds=GRACE, dry_run=True, clock=ahead)
    gone = {doomed.files[0].sha256, orphan.sha256}
    assert {i.key.rsplit("/", 1)[-1] for i in dry.deleted} == gone
    assert dry.deleted_bytes == doomed.files[0].size + orphan.size
    assert _blob_keys(registry) == before and "would delete 2 blobs" in dry.summary()

    young = collect_garbage(registry, grace_seconds=GRACE)  # real clock: all still in the grace period
    assert young.deleted == [] and young.kept_young == 2

    report = collect_garbage(registry, grace_seconds=GRACE, clock=ahead)
    assert _blob_keys(registry) == before - gone and report.deleted_bytes == dry.deleted_bytes
    _assert_complete(registry, kept, tmp_path / "out")
    registry.datasets.fetch_images(registry.datasets.get("acme", dataset.id), tmp_path / "ds")
    assert registry.checkpoints.latest("acme", "job-1") is not None
    assert {f.sha256 for f in base.files} <= _blob_keys(registry)


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_blob_shared_with_a_live_version_survives_its_deleted_twin(registry_settings: Settings,
                                                                     tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "w.safetensors")
    first = _publish(registry, lora, "one")
    _publish(registry, lora, "two")
    registry.adapters.delete_version("acme", "one", first.version)
    assert collect_garbage(registry, grace_seconds=GRACE, clock=ahead).deleted == []
    assert first.files[0].sha256 in _blob_keys(registry)


def test_documents_that_are_not_manifests_are_never_parsed_as_such(registry_settings: Settings,
                                                                   tmp_path: Path) -> None:
    """Claims, publish markers, aliases and tombstones, also of an adapter *named* "versions"."""
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "w.safetensors")
    registry.adapters.publish("acme", "versions", kind="LORA", base_model="tiny", files={LORA_WEIGHTS_FILE: lora},
                             source_job_id="job-1")
    registry.adapters.set_alias("acme", "versions", "prod", 1)
    doomed = registry.adapters.publish("acme", "deleted", kind="LORA", base_model="tiny",
                                      files={LORA_WEIGHTS_FILE: write_lora(tmp_path / "d.safetensors", seed=3)})
    registry.adapters.delete_version("acme", "deleted", doomed.version)
    report = collect_garbage(registry, grace_seconds=GRACE, clock=ahead)
    assert [i.key.rsplit("/", 1)[-1] for i in report.deleted] == [doomed.files[0].sha256]
    assert report.manifests == 1


def test_an_unreadable_manifest_aborts_before_deleting_anything(registry_settings: Settings,
                                                                tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    registry.blobs.put_bytes(b"orphan")
    registry.store.put_bytes(registry.keys.dataset("acme", "ds-broken"), b"{not json")
    with pytest.raises(DataLoss, match="ds-broken"):
        collect_garbage(registry, grace_seconds=GRACE, clock=ahead)
    assert len(_blob_keys(registry)) == 1


def _old_orphan(registry: Registry, lora: Path, grace: float = REAL_GRACE) -> None:
    """Make `lora`'s blob an unreferenced blob older than `grace` (real time: a touch must
    be able to make it young again, and S3 dates have one-second resolution)."""
    old = _publish(registry, lora, "old")
    registry.adapters.delete_version("acme", "old", old.version)
    time.sleep(grace + 0.3)


@pytest.mark.parametrize("pause_at", ["mark", "stat"])
def test_a_publish_reusing_an_old_blob_while_gc_runs_keeps_it(registry_settings: Settings, tmp_path: Path,
                                                              pause_at: str) -> None:
    """GC listed the blob as an old orphan; the publish lands before GC marks (the manifest
    is marked), or after the mark but before GC's re-check (the touch makes it young)."""
    store = PausingStore(open_store(registry_settings))
    registry = Registry(store)  # type: ignore[arg-type]
    lora = write_lora(tmp_path / "w.safetensors")
    _old_orphan(registry, lora)
    published: list[AdapterManifest] = []
    store.pause[pause_at] = lambda: published.append(_publish(registry, lora, "new"))
    report = collect_garbage(registry, grace_seconds=REAL_GRACE)
    assert report.deleted == [] and published
    _assert_complete(registry, published[0], tmp_path / "out")


def test_a_blob_swept_before_the_manifest_is_written_is_put_back(registry_settings: Settings,
                                                                 tmp_path: Path) -> None:
    store = PausingStore(open_store(registry_settings))
    registry = Registry(store)  # type: ignore[arg-type]
    store.only_thread = "publisher"
    store.pause["claim"] = lambda: collect_garbage(registry, grace_seconds=GRACE, clock=ahead)
    result: list[AdapterManifest] = []
    thread = threading.Thread(target=lambda: result.append(_publish(registry, write_lora(tmp_path / "w.sft"))),
                              name="publisher")
    thread.start()
    thread.join(60)
    assert result, "publish failed"
    _assert_complete(registry, result[0], tmp_path / "out")


def test_publishers_reusing_an_old_orphan_race_a_gc_loop_and_lose_nothing(registry_settings: Settings,
                                                                          tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "shared.safetensors", seed=99)
    _old_orphan(registry, lora, RACE_GRACE)
    stop = threading.Event()
    runs = [0]

    def gc_loop() -> None:
        while not stop.is_set():
            collect_garbage(registry, grace_seconds=RACE_GRACE)
            runs[0] += 1

    collector = threading.Thread(target=gc_loop)
    collector.start()
    barrier = threading.Barrier(4)

    def publish(i: int) -> AdapterManifest:
        barrier.wait()
        return _publish(registry, lora, f"a{i}")

    try:
        with ThreadPoolExecutor(4) as pool:
            manifests = list(pool.map(publish, range(4)))
    finally:
        stop.set()
        collector.join(60)
    assert runs[0] >= 1
    for m in manifests:
        _assert_complete(registry, m, tmp_path / f"out-{m.name}")


def test_periodic_collector_runs_on_its_interval(local_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(local_settings))
    orphan = registry.blobs.put_bytes(b"orphan")
    collector = PeriodicCollector(registry, interval=0.05, grace_seconds=0.0).start()
    try:
        deadline = time.monotonic() + 20
        while orphan.sha256 in _blob_keys(registry) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        collector.stop()
    assert orphan.sha256 not in _blob_keys(registry) and collector.runs >= 1
    assert PeriodicCollector(registry, interval=0, grace_seconds=0).start().started is False  # 0 disables


def test_cli_registry_gc_dry_run_then_real(local_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(local_settings))
    orphan = registry.blobs.put_bytes(b"orphan bytes")
    env = {**os.environ, "ATELIER_REGISTRY_URL": local_settings.registry_url, "ATELIER_GC_GRACE_SECONDS": "0"}
    cli = [sys.executable, "-m", "atelier.cli", "registry", "gc"]
    dry = subprocess.run([*cli, "--dry-run", "-v"], env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete {registry.keys.blob(orphan.sha256)} ({orphan.size} bytes)" in dry.stdout
    assert f"would delete 1 blobs ({orphan.size} bytes)" in dry.stdout
    assert orphan.sha256 in _blob_keys(registry)
    kept = subprocess.run([*cli, "--grace-seconds", "3600"], env=env, capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0 and "deleted 0 blobs" in kept.stdout and orphan.sha256 in _blob_keys(registry)
    real = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert real.returncode == 0 and "deleted 1 blobs" in real.stdout
    assert orphan.sha256 not in _blob_keys(registry)
    registry.blobs.put_bytes(b"another orphan")
    registry.store.put_bytes(registry.keys.dataset("acme", "ds-broken"), b"{not json")
    refused = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "ds-broken" in refused.stderr and len(_blob_keys(registry)) == 1
