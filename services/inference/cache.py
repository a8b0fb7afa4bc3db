"""A thread-safe, byte-bounded LRU cache with single-flight loading: one tier of the adapter cache.

Each tier (disk blobs, host state dicts, device-attached adapters, DreamBooth components) is one
`ByteLRU` with its own bounds, eviction callback and metrics. The contract:

* `get_or_load(key, loader)` returns the cached value or runs `loader()` once, however many
  threads ask for the same missing key at the same time (single flight: the first caller loads,
  the others wait for its result or its exception). The lookup is double-checked: a lock-free
  caller never sees a half-inserted entry, and a load never starts while one is in flight.
* Inserting evicts least-recently-used entries until both bounds (bytes, entries) hold again.
  Keys in `protect` are never evicted by that insertion: the device tier protects the adapters
  of the batch it is preparing, so attaching one adapter cannot detach its companion.
* Pinned keys (`pin`) are never evicted by an insertion or by `evict`, and still count against
  both bounds, so a pin leaves less room for everything else; only `evict_where`/`clear` (ops,
  DreamBooth variants) remove them. The device tier pins the configured `pinned_adapters`.
* A value that cannot fit (alone larger than the tier, or everything else protected) is
  either refused with `CapacityError` (`strict=True`: disk and device, whose entries must be
  resident to be used) or handed to the caller without being cached (host RAM).
* `on_evict(key, value)` runs after the entry left the books, outside the lock, in the thread
  that caused the eviction; for the device tier that is always the device thread.
* Lookups may name a `user` (the caller's tenant). Each entry remembers when each user last
  touched it, so `status(user=...)` lists only what that user itself used, with its own idle
  time: a disk blob shared by content between two tenants never reveals one tenant's activity
  to the other.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.inference.metrics import TierMetrics

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CapacityError(Exception):
    """A value cannot be made resident within the tier's bounds."""


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    last_used: float
    users: dict[str, float] = field(default_factory=dict)  # user -> its own last use

    def touch(self, user: str | None, now: float) -> None:
        if user is not None:
            self.users[user] = now


@dataclass(frozen=True)
class EntryStatus:
    key: str
    nbytes: int
    idle_seconds: float


@dataclass(frozen=True)
class TierStatus:
    """A consistent snapshot of one tier, for GetCacheStatus and tests."""

    name: str
    capacity_bytes: int
    used_bytes: int
    max_entries: int
    entries: list[EntryStatus]
    hits: int
    misses: int
    evictions: int
    loads: int
    pinned: frozenset[str] = frozenset()  # labels of the pinned entries


class ByteLRU(Generic[K, V]):
    """See the module docstring. All public methods are safe to call from any thread."""

    def __init__(
        self,
        name: str,
        capacity_bytes: int,
        size_of: Callable[[V], int],
        *,
        max_entries: int = 0,
        on_evict: Callable[[K, V], None] | None = None,
        strict: bool = False,
        metrics: TierMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.max_entries = max_entries
        self._size_of = size_of
        self._on_evict = on_evict
        self._strict = strict
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, Future[V]] = {}
        self._pinned: set[K] = set()
        self._used = 0
        self._hits = self._misses = self._evictions = self._loads = 0

    # --- lookups ----------------------------------------------------------------------
    def peek(self, key: K) -> V | None:
        """The value if resident, without touching recency or metrics."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry is not None else None

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def keys(self) -> list[K]:
        """Resident keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: K, user: str | None = None) -> V | None:
        """The value if resident (a hit, made most recent), else None (a miss)."""
        with self._lock:
            value = self._hit(key, user)
            if value is None:
                self._count_miss()
            return value

    def get_or_load(self, key: K, loader: Callable[[], V], protect: Collection[K] = (),
                    user: str | None = None) -> V:
        """The cached value, or the result of exactly one concurrent `loader()` call."""
        with self._lock:
            value = self._hit(key, user)
            if value is not None:
                return value
            self._count_miss()
            future = self._inflight.get(key)
            leader = future is None
            if future is None:
                future = Future()
                self._inflight[key] = future
        if not leader:
            value = future.result()
            self.touch(key, user)  # a waiter used the entry too
            return value
        return self._load(key, loader, future, protect, user)

    def touch(self, key: K, user: str | None) -> None:
        """Record a use of a resident entry by `user` (no recency or metrics change)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.touch(user, self._clock())

    # --- mutation ---------------------------------------------------------------------
    def put(self, key: K, value: V, protect: Collection[K] = (), user: str | None = None) -> bool:
        """Insert or replace; returns whether the value is now resident."""
        with self._lock:
            evicted, stored = self._insert(key, value, protect, user)
        self._after_evictions(evicted)
        return stored

    def make_room(self, nbytes: int, protect: Collection[K] = ()) -> None:
        """Evict ahead of a load, so the memory is free before the new value is built.

        The device tier calls this before attaching an adapter: peak memory then stays
        within the bound instead of exceeding it by one adapter until the insert evicts.
        """
        with self._lock:
            if not self._feasible(nbytes, protect):
                if self._strict:
                    raise CapacityError(
                        f"{self.name} cache: no room for {nbytes} bytes "
                        f"({len(protect)} entries protected)"
                    )
                return
            evicted: list[tuple[K, _Entry[V]]] = []
            for victim in list(self._entries):
                if self._fits(nbytes):
                    break
                if victim not in protect and victim not in self._pinned:
                    entry = self._entries.pop(victim)
                    self._used -= entry.nbytes
                    evicted.append((victim, entry))
            self._evictions += len(evicted)
            self._publish_size()
        self._after_evictions(evicted)

    def evict(self, key: K) -> bool:
        """Remove one entry (running on_evict); False when it was not resident or is pinned."""
        with self._lock:
            if key in self._pinned:
                return False
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._used -= entry.nbytes
            self._evictions += 1
            self._publish_size()
        self._after_evictions([(key, entry)])
        return True

    def evict_where(self, predicate: Callable[[K], bool]) -> int:
        """Remove every entry whose key matches (e.g. all adapters of one DreamBooth variant)."""
        with self._lock:
            victims = [(k, e) for k, e in self._entries.items() if predicate(k)]
            for key, entry in victims:
                del self._entries[key]
                self._pinned.discard(key)
                self._used -= entry.nbytes
            self._evictions += len(victims)
            self._publish_size()
        self._after_evictions(victims)
        return len(victims)

    def clear(self) -> int:
        """Evict everything (on_evict runs for each entry)."""
        return self.evict_where(lambda _key: True)

    def pin(self, key: K) -> None:
        """Keep a resident entry for good (see the module docstring); KeyError if not resident."""
        with self._lock:
            if key not in self._entries:
                raise KeyError(key)
            self._pinned.add(key)

    def unpin(self, key: K) -> None:
        with self._lock:
            self._pinned.discard(key)

    def is_pinned(self, key: K) -> bool:
        with self._lock:
            return key in self._pinned

    def status(self, user: str | None = None, label: Callable[[K], str] = str) -> TierStatus:
        """Totals of the whole tier; entries most recent first.

        With `user`: only the entries that user touched, idle since *its* last use, so a
        caller learns nothing about other users' activity. Without: every entry (ops, tests).
        """
        now = self._clock()
        with self._lock:
            if user is None:
                entries = [EntryStatus(label(k), e.nbytes, max(0.0, now - e.last_used))
                           for k, e in reversed(self._entries.items())]
            else:
                mine = [(e.users[user], k, e) for k, e in reversed(self._entries.items()) if user in e.users]
                mine.sort(key=lambda t: t[0], reverse=True)
                entries = [EntryStatus(label(k), e.nbytes, max(0.0, now - at)) for at, k, e in mine]
            return TierStatus(self.name, self.capacity_bytes, self._used, self.max_entries, entries,
                              self._hits, self._misses, self._evictions, self._loads,
                              frozenset(label(k) for k in self._pinned))

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    # --- internals --------------------------------------------------------------------
    def _hit(self, key: K, user: str | None = None) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_used = self._clock()
        entry.touch(user, entry.last_used)
        self._entries.move_to_end(key)
        self._hits += 1
        if self._metrics:
            self._metrics.hits.inc()
        return entry.value

    def _count_miss(self) -> None:
        self._misses += 1
        if self._metrics:
            self._metrics.misses.inc()

    def _load(self, key: K, loader: Callable[[], V], future: Future[V], protect: Collection[K],
              user: str | None) -> V:
        started = time.perf_counter()
        try:
            value = loader()
            with self._lock:
                evicted, _stored = self._insert(key, value, protect, user)
                self._loads += 1
        except BaseException as exc:
            with self._lock:
                self._inflight.pop(key, None)
            future.set_exception(exc)
            raise
        with self._lock:
            self._inflight.pop(key, None)
        if self._metrics:
            self._metrics.load_seconds.observe(time.perf_counter() - started)
        future.set_result(value)
        self._after_evictions(evicted)
        return value

    def _insert(self, key: K, value: V, protect: Collection[K],
                user: str | None = None) -> tuple[list[tuple[K, _Entry[V]]], bool]:
        """Make room and insert under the lock; returns (evicted entries, stored?).

        Feasibility is checked first, so a value that cannot fit evicts nothing.
        """
        nbytes = int(self._size_of(value))
        old = self._entries.pop(key, None)
        if old is not None:
            self._used -= old.nbytes
        if not self._feasible(nbytes, protect):
            if old is not None:
                self._entries[key] = old
                self._used += old.nbytes
            if self._strict:
                raise CapacityError(
                    f"{self.name} cache: {nbytes} bytes do not fit in {self.capacity_bytes} bytes "
                    f"(max {self.max_entries or 'unbounded'} entries, {len(protect)} protected)"
                )
            return [], False
        evicted: list[tuple[K, _Entry[V]]] = []
        for victim in list(self._entries):
            if self._fits(nbytes):
                break
            if victim in protect or victim in self._pinned:
                continue
            entry = self._entries.pop(victim)
            self._used -= entry.nbytes
            evicted.append((victim, entry))
        self._evictions += len(evicted)
        entry = _Entry(value, nbytes, self._clock())
        if old is not None:
            entry.users.update(old.users)
        entry.touch(user, entry.last_used)
        self._entries[key] = entry
        self._used += nbytes
        self._publish_size()
        return evicted, True

    def _feasible(self, nbytes: int, protect: Collection[K]) -> bool:
        """Would evicting every unprotected entry make room for `nbytes`?"""
        kept = [e.nbytes for k, e in self._entries.items() if k in protect or k in self._pinned]
        entries_ok = self.max_entries <= 0 or len(kept) + 1 <= self.max_entries
        return entries_ok and sum(kept) + nbytes <= self.capacity_bytes

    def _fits(self, nbytes: int) -> bool:
        entries_ok = self.max_entries <= 0 or len(self._entries) < self.max_entries
        return entries_ok and self._used + nbytes <= self.capacity_bytes

    def _publish_size(self) -> None:
        if self._metrics:
            self._metrics.used_bytes.set(self._used)
            self._metrics.entries.set(len(self._entries))

    def _after_evictions(self, evicted: list[tuple[K, _Entry[V]]]) -> None:
        if not evicted:
            return
        if self._metrics:
            self._metrics.evictions.inc(len(evicted))
        if self._on_evict is not None:
            for key, entry in evicted:
                self._on_evict(key, entry.value)
