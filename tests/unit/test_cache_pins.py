"""ByteLRU pins: never evicted by pressure or `evict`, counted against both bounds."""

from __future__ import annotations

import pytest

from services.inference.cache import ByteLRU, CapacityError


def make(capacity: int = 10, **kw: object) -> tuple[ByteLRU[str, bytes], list[str]]:
    evicted: list[str] = []
    cache: ByteLRU[str, bytes] = ByteLRU(
        "t", capacity, len, on_evict=lambda k, _v: evicted.append(k), strict=True, **kw  # type: ignore[arg-type]
    )
    return cache, evicted


def test_eviction_skips_pins_however_old() -> None:
    cache, evicted = make(10)
    cache.put("pin", b"xxxx")
    cache.pin("pin")
    for i in range(20):  # many others cycle through the 6 bytes left
        cache.put(f"k{i}", b"xxx")
        cache.make_room(3)
    assert "pin" in cache and "pin" not in evicted
    assert cache.is_pinned("pin") and len(evicted) >= 18
    assert cache.used_bytes <= cache.capacity_bytes
    assert cache.evict("pin") is False and "pin" in cache  # explicit evict refuses a pin too


def test_pins_count_against_bytes_and_entries() -> None:
    cache, _ = make(10, max_entries=3)
    cache.put("p1", b"xxxx")
    cache.pin("p1")
    cache.put("p2", b"xxxx")
    cache.pin("p2")
    with pytest.raises(CapacityError):
        cache.put("big", b"xxx")  # 8 pinned + 3 > 10
    with pytest.raises(CapacityError):
        cache.make_room(3)
    cache.put("ok", b"xx")  # exactly the 2 bytes left
    assert cache.used_bytes == 10
    cache.put("next", b"xx")  # evicts "ok", never a pin
    assert cache.keys() == ["p1", "p2", "next"]
    cache.unpin("p1")
    cache.put("big", b"xxxx")  # now p1 may go
    assert "p1" not in cache and "p2" in cache
    status = cache.status()
    assert status.pinned == frozenset({"p2"})


def test_entries_bound_with_pins() -> None:
    cache, _ = make(100, max_entries=2)
    for key in ("a", "b"):
        cache.put(key, b"x")
        cache.pin(key)
    with pytest.raises(CapacityError):
        cache.put("c", b"x")


def test_pin_needs_a_resident_key_and_clear_drops_pins() -> None:
    cache, evicted = make(10)
    with pytest.raises(KeyError):
        cache.pin("missing")
    cache.put("a", b"x")
    cache.pin("a")
    assert cache.clear() == 1 and evicted == ["a"]
    assert not cache.is_pinned("a")
    cache.put("a", b"x")
    assert not cache.is_pinned("a")  # a re-load is not pinned by itself
