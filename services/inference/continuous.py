"""Step-level continuous batching, event-loop side: admit and retire requests between steps.

`ContinuousBatcher` is the engine's batcher. Requests the step loop serves (`WorkItem.stream`,
see step_loop.streamable) wait in their own queue; each turn of the worker:

1. drops dead waiting requests, and retires running ones whose caller left or whose deadline
   passed (their rows leave the batch and their slot is free at this step);
2. admits waiting stream requests, fair across tenants (batcher.py's lead order), while the
   running set stays within `max_batch` requests and its distinct adapters within
   `max_adapters` (the device tier holds all of them at once; an empty running set always takes
   its first request). It stops at the first request that does not fit, so a request with many
   adapters waits for rows to finish rather than being overtaken for ever;
3. runs one denoising step for the running set on the device thread, and answers the requests
   whose last step that was (their VAE decode already done).

Requests that keep the pipeline-call path (DreamBooth, TIES/DARE, img2img...) queue as before;
when one is waiting, admission pauses, and once the running set has drained the pipeline batch
runs (two code paths never interleave on the weights). Its wait is bounded by the longest
running request's remaining steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from services.common.errors import Cancelled
from services.inference.abort import BatchAborted
from services.inference.batcher import Batcher, WorkItem
from services.inference.metrics import InferenceMetrics

Admit = Callable[[list[WorkItem]], Awaitable[list[BaseException | None]]]
Step = Callable[[list[WorkItem]], Awaitable[list[tuple[WorkItem, Any]]]]


class ContinuousBatcher(Batcher):
    """See the module docstring."""

    def __init__(self, capacity: int, max_batch: int, batch_wait_s: float,
                 execute: Callable[[list[WorkItem]], Awaitable[None]], metrics: InferenceMetrics,
                 admit: Admit, step: Step, max_adapters: int = 0) -> None:
        super().__init__(capacity, max_batch, batch_wait_s, execute, metrics, max_adapters)
        self._admit_rows = admit
        self._step_rows = step
        self._stream: list[WorkItem] = []
        self.running: list[WorkItem] = []

    def _waiting_for(self, item: WorkItem) -> list[WorkItem]:
        return self._stream if item.stream else self._queue

    def _waiting(self) -> tuple[list[WorkItem], ...]:
        return (self._queue, self._stream)

    async def close(self) -> None:
        await super().close()
        self._shut_out(self.running)

    # --- the worker -------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            await self._until(lambda: bool(self._queue or self._stream or self.running))
            self._drop_dead()
            self._retire_dead()
            if self._queue and not self.running:
                await self._run_next_batch()
                continue
            if not self._queue:
                await self._admit()
            if self.running:
                await self._step()

    def _retire_dead(self) -> None:
        for item in [i for i in self.running if i.dead()]:
            self.running.remove(item)
            item.fail(item.why_dead())

    async def _admit(self) -> None:
        union: set[Hashable] = set().union(*(i.adapters for i in self.running))
        candidates, picked = list(self._stream), list[WorkItem]()
        while candidates and len(self.running) + len(picked) < self._max_batch:
            item = self._lead(candidates)
            if not self._fits(union, item, not self.running and not picked):
                break
            candidates.remove(item)
            picked.append(item)
            union |= item.adapters
        if not picked:
            return
        self._start(picked)
        errors = await self._admit_rows(picked)
        for item, error in zip(picked, errors, strict=True):
            if error is None:
                self.running.append(item)
            else:
                item.fail(error)
        self._record(picked, self.running)

    async def _step(self) -> None:
        running = list(self.running)
        try:
            finished = await self._step_rows(running)
        except Exception as exc:  # BatchAborted (everyone dead, shutdown) or a device failure
            for item in running:
                if isinstance(exc, BatchAborted):
                    item.fail(item.why_dead() if item.dead() else Cancelled("the server is shutting down"))
                else:
                    item.fail(exc)
            self.running.clear()
            return
        for item, output in finished:
            with contextlib.suppress(ValueError):
                self.running.remove(item)
            if not item.future.done():
                item.future.set_result(output)
