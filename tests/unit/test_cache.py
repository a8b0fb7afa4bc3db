"""ByteLRU: byte and count bounds, LRU order, single flight, protection, strictness, metrics."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import CollectorRegistry

from services.inference.cache import ByteLRU, CapacityError
from services.inference.metrics import InferenceMetrics


def make(capacity: int = 10, **kw: object) -> tuple[ByteLRU[str, bytes], list[str]]:
    evicted: list[str] = []
    cache: ByteLRU[str, bytes] = ByteLRU(
        "t", capacity, len, on_evict=lambda k, _v: evicted.append(k), **kw  # type: ignore[arg-type]
    )
    return cache, evicted


def test_evicts_least_recently_used_until_bytes_fit() -> None:
    cache, evicted = make(10)
    cache.put("a", b"xxxx")
    cache.put("b", b"xxxx")
    assert cache.get("a") == b"xxxx"  # a becomes most recent
    cache.put("c", b"xxxx")
    assert evicted == ["b"]
    assert cache.keys() == ["a", "c"]
    assert cache.used_bytes == 8 <= cache.capacity_bytes


def test_max_entries_bound() -> None:
    cache, evicted = make(1000, max_entries=2)
    for key in "abc":
        cache.put(key, b"x")
    assert evicted == ["a"] and cache.keys() == ["b", "c"]


def test_oversize_value_passes_through_uncached_unless_strict() -> None:
    cache, evicted = make(4)
    cache.put("small", b"xx")
    assert cache.get_or_load("big", lambda: b"x" * 5) == b"x" * 5
    assert "big" not in cache and "small" in cache and evicted == []
    strict, strict_evicted = make(4, strict=True)
    strict.put("small", b"xx")
    with pytest.raises(CapacityError):
        strict.get_or_load("big", lambda: b"x" * 5)
    assert "small" in strict and strict_evicted == []


def test_protected_keys_survive_and_infeasible_insert_evicts_nothing() -> None:
    cache, evicted = make(10, strict=True)
    cache.put("a", b"xxxx")
    cache.put("b", b"xxxx")
    cache.put("c", b"xxxx", protect={"a"})
    assert evicted == ["b"] and set(cache.keys()) == {"a", "c"}
    with pytest.raises(CapacityError):
        cache.put("d", b"xxxxxxx", protect={"a", "c"})
    assert set(cache.keys()) == {"a", "c"} and evicted == ["b"]


def test_single_flight_one_load_for_concurrent_callers() -> None:
    cache, _ = make(100)
    calls = 0
    gate = threading.Event()

    def loader() -> bytes:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return b"value"

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(cache.get_or_load, "k", loader) for _ in range(16)]
        time.sleep(0.2)
        gate.set()
        results = [f.result(5) for f in futures]
    assert calls == 1
    assert results == [b"value"] * 16
    status = cache.status()
    assert status.loads == 1 and status.misses + status.hits == 16


def test_failed_load_is_shared_and_not_cached() -> None:
    cache, _ = make(100)
    gate = threading.Event()
    calls = 0

    def failing() -> bytes:
        nonlocal calls
        calls += 1
        gate.wait(5)
        raise OSError("store down")

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get_or_load, "k", failing) for _ in range(4)]
        time.sleep(0.2)
        gate.set()
        for f in futures:
            with pytest.raises(OSError):
                f.result(5)
    assert calls == 1 and "k" not in cache
    assert cache.get_or_load("k", lambda: b"ok") == b"ok"  # a later call loads again


def test_evict_where_and_clear_run_callbacks() -> None:
    cache, evicted = make(100)
    for key in ("v1/a", "v1/b", "v2/a"):
        cache.put(key, b"x")
    assert cache.evict_where(lambda k: k.startswith("v1/")) == 2
    assert sorted(evicted) == ["v1/a", "v1/b"]
    assert cache.clear() == 1 and cache.used_bytes == 0


def test_metrics_follow_the_books() -> None:
    registry = CollectorRegistry()
    metrics = InferenceMetrics(registry)
    cache: ByteLRU[str, bytes] = ByteLRU("host", 4, len, metrics=metrics.tier("host"))
    cache.get_or_load("a", lambda: b"xx")
    cache.get_or_load("a", lambda: b"xx")
    cache.get_or_load("b", lambda: b"xxx")

    def value(name: str) -> float:
        return registry.get_sample_value(name, {"tier": "host"}) or 0.0

    assert value("atelier_inference_cache_hits_total") == 1
    assert value("atelier_inference_cache_misses_total") == 2
    assert value("atelier_inference_cache_evictions_total") == 1
    assert value("atelier_inference_cache_bytes") == 3
    assert value("atelier_inference_cache_load_seconds_count") == 2


def test_make_room_evicts_before_the_load() -> None:
    cache, evicted = make(10, max_entries=3, strict=True)
    for key in "abc":
        cache.put(key, b"xxx")
    cache.make_room(3, protect={"a"})
    assert evicted == ["b"] and cache.used_bytes == 6
    with pytest.raises(CapacityError):
        cache.make_room(9, protect={"a", "c"})
    assert evicted == ["b"]
