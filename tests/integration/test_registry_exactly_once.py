"""Exactly one version per training job under every interleaving of two publishers.

The interleavings are produced deterministically: a store wrapper stops one publisher at a
chosen write (claim, marker or manifest) until the other has finished, or makes that write
"crash" (raise) the way a SIGKILL would leave it. Runs on the local store and on S3 (moto).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from services.common.config import Settings
from services.common.errors import AdapterNotFound, FailedPrecondition
from services.registry.manifests import LORA_WEIGHTS_FILE, AdapterManifest
from services.registry.registry import Registry
from services.registry.store import ObjectStore, open_store
from tests.fixtures.s3 import write_lora

JOB = "job-0001"


class Crash(Exception):
    """Stands in for the process dying at that point."""


class GatedStore:
    """Delegates to a real store; `gates[marker]` runs (in the writing thread) before a put
    whose key contains `marker` and whose thread is named in `threads` (empty: any)."""

    def __init__(self, inner: ObjectStore) -> None:
        self._inner = inner
        self.gates: dict[str, Callable[[], None]] = {}
        self.threads: set[str] = set()

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        if not self.threads or threading.current_thread().name in self.threads:
            for marker, gate in list(self.gates.items()):
                if marker in key:
                    del self.gates[marker]
                    gate()
        return self._inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def gated(registry_settings: Settings) -> Iterator[tuple[Registry, GatedStore]]:
    store = GatedStore(open_store(registry_settings))
    yield Registry(store), store  # type: ignore[arg-type]


def _publish(registry: Registry, tmp_path: Path, seed: int, job_id: str = JOB) -> AdapterManifest:
    lora = write_lora(tmp_path / f"w{seed}.safetensors", seed=seed)
    return registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny", source_job_id=job_id,
                                    files={LORA_WEIGHTS_FILE: lora}, description=f"publisher-{seed}")


def _versions(registry: Registry) -> list[AdapterManifest]:
    return registry.adapters.list_versions("acme", "cat", page_size=100)[0]


def _stalled_race(registry: Registry, store: GatedStore, tmp_path: Path, at: str) -> tuple[int, int]:
    """Publisher 1 stops right before its `at` write; publisher 2 runs to the end; then 1 goes on."""
    released, reached = threading.Event(), threading.Event()

    def stall() -> None:
        reached.set()
        assert released.wait(30)

    store.gates[at] = stall
    store.threads = {"stalled"}
    results: dict[str, int] = {}
    stalled = threading.Thread(target=lambda: results.update(first=_publish(registry, tmp_path, 1).version),
                               name="stalled")
    stalled.start()
    assert reached.wait(30)
    second = _publish(registry, tmp_path, 2).version
    released.set()
    stalled.join(30)
    return results["first"], second


@pytest.mark.parametrize("at", ["/claims/", "/jobs/", "/versions/"])
def test_a_stalled_publisher_and_a_second_one_yield_one_version(gated: tuple[Registry, GatedStore],
                                                                tmp_path: Path, at: str) -> None:
    registry, store = gated
    first, second = _stalled_race(registry, store, tmp_path, at)
    versions = _versions(registry)
    assert first == second and [v.version for v in versions] == [first]
    assert registry.adapters.job_version("acme", "cat", JOB) == versions[0]
    # whoever wrote the manifest, its blobs are complete and the later publishers adopted it
    files = registry.adapters.fetch_files(versions[0], tmp_path / "out")
    seed = int(versions[0].description.split("-")[1])
    assert files[LORA_WEIGHTS_FILE].read_bytes() == (tmp_path / f"w{seed}.safetensors").read_bytes()


@pytest.mark.parametrize("at", ["/claims/", "/jobs/", "/versions/"])
def test_a_crash_at_any_write_then_a_retry_yields_one_version(gated: tuple[Registry, GatedStore],
                                                              tmp_path: Path, at: str) -> None:
    registry, store = gated

    def crash() -> None:
        raise Crash(at)

    store.gates[at] = crash
    with pytest.raises(Crash):
        _publish(registry, tmp_path, 1)
    if at == "/versions/":  # the marker is there, its manifest is not: not published yet
        assert registry.adapters.job_version("acme", "cat", JOB) is None
    retried = _publish(registry, tmp_path, 2)
    assert [v.version for v in _versions(registry)] == [retried.version]
    assert _publish(registry, tmp_path, 3).version == retried.version  # a third attempt adopts too
    assert registry.adapters.job_version("acme", "cat", JOB) == retried


def test_many_concurrent_publishers_of_one_job_and_others(registry_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    barrier = threading.Barrier(8)

    def publish(i: int) -> tuple[str, int]:
        job = JOB if i % 2 == 0 else f"job-other-{i}"
        barrier.wait()
        return job, _publish(registry, tmp_path, i, job).version

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(publish, range(8)))
    ours = {v for job, v in results if job == JOB}
    assert len(ours) == 1
    versions = _versions(registry)
    by_job = [v.source_job_id for v in versions]
    assert sorted(by_job) == sorted({job for job, _ in results})  # one version per job, none lost
    assert len({v.version for v in versions}) == len(versions)


def test_plain_publishes_still_number_densely(registry_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "w.safetensors")
    got = [registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny",
                                    files={LORA_WEIGHTS_FILE: lora}).version for _ in range(3)]
    assert got == [1, 2, 3]


def test_a_deleted_job_version_is_not_resurrected(registry_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    published = _publish(registry, tmp_path, 1)
    registry.adapters.delete_version("acme", "cat", published.version)
    with pytest.raises(FailedPrecondition, match="was deleted"):
        _publish(registry, tmp_path, 2)  # a stalled publisher of the same job waking up
    assert registry.adapters.job_version("acme", "cat", JOB) is None
    with pytest.raises(AdapterNotFound):
        _versions(registry)
