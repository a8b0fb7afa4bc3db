"""ByteLRU's per-user use records (what GetCacheStatus filters on) and the S3 deadline budget."""

from __future__ import annotations

import threading

from services.inference.cache import ByteLRU
from services.registry.s3 import deadline_budget
from tests.fixtures.clock import ManualClock


def test_status_lists_only_the_users_own_entries_with_its_own_idle_time() -> None:
    clock = ManualClock()
    cache: ByteLRU[str, bytes] = ByteLRU("disk", 100, len, clock=clock)
    cache.get_or_load("blob", lambda: b"xxxx", user="a")
    clock.now += 1
    cache.put("other", b"yy", user="a")
    cache.put("adopted", b"z")  # e.g. found on disk at start-up: nobody's
    clock.now += 10
    assert cache.get("blob", user="b") == b"xxxx"
    clock.now += 5
    mine = cache.status("a")
    assert [(e.key, e.idle_seconds) for e in mine.entries] == [("other", 15.0), ("blob", 16.0)]
    assert [(e.key, e.idle_seconds) for e in cache.status("b").entries] == [("blob", 5.0)]
    assert cache.status("c").entries == []
    assert mine.used_bytes == 7  # totals stay global
    assert [e.key for e in cache.status().entries] == ["blob", "adopted", "other"]  # ops view: all, LRU order


def test_single_flight_waiters_and_replacements_keep_every_users_record() -> None:
    cache: ByteLRU[str, bytes] = ByteLRU("host", 100, len)
    started, release = threading.Event(), threading.Event()

    def slow() -> bytes:
        started.set()
        release.wait(5)
        return b"v"

    leader = threading.Thread(target=lambda: cache.get_or_load("k", slow, user="a"))
    leader.start()
    started.wait(5)
    waiter = threading.Thread(target=lambda: cache.get_or_load("k", lambda: b"never", user="b"))
    waiter.start()
    release.set()
    leader.join()
    waiter.join()
    assert [e.key for e in cache.status("b").entries] == ["k"]  # the waiter used it too
    cache.put("k", b"w", user="c")  # replaced: earlier users keep their records
    assert all([e.key for e in cache.status(u).entries] == ["k"] for u in ("a", "b", "c"))
    cache.evict("k")
    assert cache.status("a").entries == []


def test_deadline_budget_keeps_a_margin_for_the_answer() -> None:
    assert deadline_budget(10.0) == 9.5
    assert deadline_budget(1.0) == 0.75
    assert deadline_budget(0.0) == 0.0
