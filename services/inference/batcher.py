"""Admission and batching in front of the device.

* Admission: at most `capacity` requests may be waiting (resolving adapters or queued for the
  device). The next one is refused at once with RESOURCE_EXHAUSTED (+ RetryInfo): a full
  queue never makes a caller wait. A request leaves the count when it enters a batch.
* Fair queueing across tenants: the next batch is led by the oldest request of the tenant
  served least recently (round robin over the tenants with waiting requests, one batch per
  turn), so a tenant flooding the queue delays another tenant's request by at most one batch,
  not by its whole backlog. Within a tenant, requests go in arrival order.
* Batching: once the lead request has waited `batch_wait` seconds (or enough companions are
  there), every other waiting request with the same `BatchKey` (base model, DreamBooth weights,
  TIES/DARE mixes, size, steps, scheduler, guidance; LINEAR LoRA sets and TI differ freely
  within a batch) joins, up to `max_batch` and while the batch's distinct adapters stay within
  `max_adapters` (the device tier attaches them together), taken round robin
  across tenants (the lead's tenant first) and in arrival order within each. Every tenant
  in a batch counts as served. Requests whose caller went away or whose deadline passed are
  dropped here.
* The device runs one batch at a time: the worker awaits `execute(batch)` before the next.
All methods run on the event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from services.common.background import BackgroundTask
from services.common.errors import AtelierError, Cancelled, DeadlineExceeded, ResourceExhausted
from services.inference.metrics import InferenceMetrics
from services.inference.types import Progress

BatchKey = tuple[Hashable, ...]
MAX_TRACKED_TENANTS = 10_000


@dataclass(eq=False)
class WorkItem:
    """One admitted request on its way to the device."""

    key: BatchKey
    payload: Any  # what the executor needs (request, base model, adapters)
    future: asyncio.Future[Any]
    deadline: float | None = None  # time.monotonic() value
    progress: Callable[[Progress], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    tenant: str = ""  # fair queueing unit
    adapters: frozenset[Hashable] = frozenset()  # what it attaches on the device (LoRA/TI keys)
    stream: bool = False  # served by the step-level scheduler (continuous.py), not a pipeline call

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def dead(self) -> bool:
        """Nobody wants the result any more (thread-safe: the device thread asks too)."""
        return self.cancelled.is_set() or self.expired() or self.future.done()

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def why_dead(self) -> AtelierError:
        if self.expired():
            return DeadlineExceeded("the request's deadline passed before it finished")
        return Cancelled("the request was cancelled")


class Batcher:
    """See the module docstring."""

    def __init__(self, capacity: int, max_batch: int, batch_wait_s: float,
                 execute: Callable[[list[WorkItem]], Awaitable[None]], metrics: InferenceMetrics,
                 max_adapters: int = 0) -> None:
        self.capacity = capacity
        self._max_adapters = max_adapters  # bound on a batch's distinct adapters (0: none)
        self._max_batch = max(1, max_batch)
        self._wait = max(0.0, batch_wait_s)
        self._execute = execute
        self._metrics = metrics
        self._pending = 0
        self._queue: list[WorkItem] = []
        self._wakeup = asyncio.Event()
        self._worker = BackgroundTask("atelier-batcher", self._run)
        self._turn = 0
        self._served: dict[str, int] = {}  # tenant -> turn of its last batch

    @property
    def depth(self) -> int:
        return self._pending

    # --- admission --------------------------------------------------------------------
    def admit(self) -> None:
        """Take a slot or raise ResourceExhausted immediately."""
        if self._pending >= self.capacity:
            self._metrics.rejected.inc()
            raise ResourceExhausted(f"the inference queue is full ({self.capacity} requests waiting)",
                                    retry_after_seconds=1.0)
        self._pending += 1
        self._metrics.queue_depth.set(self._pending)

    def release(self) -> None:
        """Give back a slot of a request that leaves before entering a batch."""
        self._pending = max(0, self._pending - 1)
        self._metrics.queue_depth.set(self._pending)

    def submit(self, item: WorkItem) -> None:
        """Queue an admitted request (its slot is released when it enters a batch)."""
        self._worker.ensure_started()
        self._waiting_for(item).append(item)
        self._wakeup.set()

    def withdraw(self, item: WorkItem) -> bool:
        """Remove a queued request (its caller left); False when it already entered a batch."""
        queue = self._waiting_for(item)
        if item in queue:
            queue.remove(item)
            self.release()
            return True
        return False

    # --- the waiting queues (a subclass may keep more than one) ---------------------------
    def _waiting_for(self, item: WorkItem) -> list[WorkItem]:
        """The queue an admitted request waits in until it enters a batch."""
        return self._queue

    def _waiting(self) -> tuple[list[WorkItem], ...]:
        """Every queue of admitted requests not yet in a batch."""
        return (self._queue,)

    def _start(self, entering: list[WorkItem]) -> None:
        """Requests leave their queue for the device: slots released, start time stamped, tenants
        marked served."""
        now = time.monotonic()
        for item in entering:
            self._waiting_for(item).remove(item)
            self.release()
            item.started_at = now
        self._mark_served(entering)

    def _drop_dead(self) -> None:
        for queue in self._waiting():
            for item in [i for i in queue if i.dead()]:
                queue.remove(item)
                self.release()
                item.fail(item.why_dead())

    @staticmethod
    def _shut_out(items: list[WorkItem]) -> None:
        for item in items:
            item.fail(Cancelled("the server is shutting down"))
        items.clear()

    # --- the worker -------------------------------------------------------------------
    async def close(self) -> None:
        await self._worker.stop()
        for queue in self._waiting():
            self._shut_out(queue)

    async def _run(self) -> None:
        while True:
            await self._run_next_batch()

    async def _until(self, ready: Callable[[], bool]) -> None:
        """Sleep until `ready()` holds, woken by every submit."""
        while not ready():
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _run_next_batch(self) -> None:
        """Form the next pipeline batch (waiting for one) and execute it."""
        batch = await self._next_batch()
        if batch:
            self._record(batch, batch)
            await self._execute(batch)

    def _record(self, entered: list[WorkItem], batch: list[WorkItem]) -> None:
        """Metrics for requests `entered` into `batch` (the batch as it runs now)."""
        self._metrics.batch_size.observe(len(batch))
        self._metrics.adapters_per_batch.observe(len(frozenset().union(*(i.adapters for i in batch))))
        for item in entered:
            self._metrics.queue_wait.observe(max(0.0, item.started_at - item.enqueued_at))

    async def _next_batch(self) -> list[WorkItem]:
        await self._until(lambda: bool(self._queue))
        self._drop_dead()
        if not self._queue:
            return []
        first = self._lead()
        remaining = first.enqueued_at + self._wait - time.monotonic()
        if remaining > 0 and len(self._companions(first)) < self._max_batch:
            await asyncio.sleep(remaining)
            self._drop_dead()
            if first not in self._queue:
                return []
        batch = self._companions(first)
        self._start(batch)
        return batch

    def _lead(self, queue: list[WorkItem] | None = None) -> WorkItem:
        """The oldest request of the least recently served tenant (ties: the oldest request)."""
        heads: dict[str, WorkItem] = {}
        for item in self._queue if queue is None else queue:
            heads.setdefault(item.tenant, item)
        tenant = min(heads, key=lambda t: (self._served.get(t, -1), heads[t].enqueued_at))
        return heads[tenant]

    def _companions(self, first: WorkItem) -> list[WorkItem]:
        """Same-key requests, round robin across tenants starting with the lead's."""
        by_tenant: dict[str, list[WorkItem]] = {first.tenant: []}
        for item in self._queue:
            if item.key == first.key:
                by_tenant.setdefault(item.tenant, []).append(item)
        lanes = [by_tenant.pop(first.tenant), *sorted(by_tenant.values(),
                                                       key=lambda v: self._served.get(v[0].tenant, -1))]
        batch: list[WorkItem] = []
        union: set[Hashable] = set()
        depth = 0
        while len(batch) < self._max_batch and any(depth < len(lane) for lane in lanes):
            for item in (lane[depth] for lane in lanes if depth < len(lane)):
                if len(batch) < self._max_batch and self._fits(union, item, not batch):
                    batch.append(item)
                    union |= item.adapters
            depth += 1
        return batch

    def _fits(self, union: set[Hashable], item: WorkItem, lead: bool) -> bool:
        """The lead always goes; a companion only while the batch's distinct adapters stay within
        the device tier's entry bound (they are attached together)."""
        return lead or not self._max_adapters or len(union | item.adapters) <= self._max_adapters

    def _mark_served(self, batch: list[WorkItem]) -> None:
        """Record this turn for the batch's tenants. Turns are kept for idle tenants too: if an
        idle tenant were forgotten, tenants with one request at a time would always rank first
        and could starve a backlogged one. The map is bounded by the tenant count (API keys)."""
        self._turn += 1
        for item in batch:
            self._served[item.tenant] = self._turn
        if len(self._served) > MAX_TRACKED_TENANTS:
            waiting = {item.tenant for item in self._queue}
            self._served = {t: turn for t, turn in self._served.items() if t in waiting}
