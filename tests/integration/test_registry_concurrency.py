"""Concurrent publishers and alias writers against the registry (S3 and local stores)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.common.config import Settings
from services.common.errors import PreconditionConflict
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.registry.store import open_store
from tests.fixtures.s3 import write_lora

PUBLISHERS = 8


def _publish_concurrently(registry: Registry, tmp_path: Path) -> list[int]:
    files = [write_lora(tmp_path / f"l{i}.safetensors", seed=i) for i in range(PUBLISHERS)]
    barrier = threading.Barrier(PUBLISHERS)

    def publish(i: int) -> int:
        barrier.wait()  # everyone reads the same "latest" and races for the same number
        return registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny",
                                        files={LORA_WEIGHTS_FILE: files[i]}, description=f"publisher-{i}").version

    with ThreadPoolExecutor(PUBLISHERS) as pool:
        return list(pool.map(publish, range(PUBLISHERS)))


def test_eight_concurrent_publishers_get_versions_one_to_eight(registry_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    versions = _publish_concurrently(registry, tmp_path)
    assert sorted(versions) == list(range(1, PUBLISHERS + 1))
    stored, _ = registry.adapters.list_versions("acme", "cat", page_size=100)
    # none lost, none overwritten: each publisher's manifest sits at the version it was told
    assert {m.version: m.description for m in stored} == {v: f"publisher-{i}" for i, v in enumerate(versions)}
    for m in stored:
        files = registry.adapters.fetch_files(m, tmp_path / f"out{m.version}")
        i = int(m.description.split("-")[1])
        assert files[LORA_WEIGHTS_FILE].read_bytes() == (tmp_path / f"l{i}.safetensors").read_bytes()


def test_compare_and_swap_race_has_exactly_one_winner(registry_settings: Settings, tmp_path: Path) -> None:
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "l.safetensors")
    for _ in range(PUBLISHERS + 1):
        registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny", files={LORA_WEIGHTS_FILE: lora})
    registry.adapters.set_alias("acme", "cat", "prod", 1)
    barrier = threading.Barrier(PUBLISHERS)

    def swap(target: int) -> int | str:
        barrier.wait()
        try:
            registry.adapters.set_alias("acme", "cat", "prod", target, expected_version=1)
            return target
        except PreconditionConflict as exc:
            return exc.message

    with ThreadPoolExecutor(PUBLISHERS) as pool:
        results = list(pool.map(swap, range(2, PUBLISHERS + 2)))
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1
    assert all("alias 'prod' of adapter 'cat' was not changed" in r for r in results if isinstance(r, str))
    assert registry.adapters.resolve(AdapterRef("acme", "cat", alias="prod")).version == winners[0]


def test_unconditional_alias_writers_all_succeed_last_one_wins(registry_settings: Settings, tmp_path: Path) -> None:
    """Without expected_version a lost race is retried, so every writer succeeds."""
    registry = Registry(open_store(registry_settings))
    lora = write_lora(tmp_path / "l.safetensors")
    for _ in range(4):
        registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny", files={LORA_WEIGHTS_FILE: lora})
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda v: registry.adapters.set_alias("acme", "cat", "prod", v), range(1, 5)))
    assert registry.adapters.resolve(AdapterRef("acme", "cat", alias="prod")).version in range(1, 5)
