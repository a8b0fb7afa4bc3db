"""The device thread and the watchdog that reports it stuck.

`DeviceThread` is a one-thread executor like `ThreadPoolExecutor(1)`, except that its thread is
a daemon. `ThreadPoolExecutor` joins its threads at interpreter exit, so one kernel that never
returns (or a minutes-long forward that nobody can interrupt) kept a SIGTERMed server alive
long past its grace period. Shutdown aborts device work cooperatively (see abort.py) and waits
for the thread a bounded time; after that the process may exit with the thread still running.

`DeviceWatchdog` polls, on the event loop, what the device is running: once every request of
the running batch has been dead (cancelled or past its deadline) for `stuck_seconds`, the
device is stuck on work nobody wants and the server reports NOT_SERVING (readiness takes the
replica out of rotation; if it stays stuck, liveness restarts it). SERVING returns once the
device moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, Future
from typing import Any

from services.common.background import BackgroundTask
from services.inference.abort import AbortGuard

log = logging.getLogger(__name__)

_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DeviceThread(Executor):
    """A single daemon worker thread running submitted calls in order (see module doc)."""

    def __init__(self, name: str = "atelier-device") -> None:
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            if not self._thread.is_alive():
                self._thread.start()
            self._tasks.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._thread.is_alive()
        if cancel_futures:
            with contextlib.suppress(queue.Empty):
                while (task := self._tasks.get_nowait()) is not None:
                    task[0].cancel()
        self._tasks.put(None)
        if wait and started:
            self._thread.join()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end after shutdown; True if it did."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args, kwargs = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the waiting caller, like ThreadPoolExecutor
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, fn, args, kwargs, task


Report = Callable[[bool], Awaitable[None]]


class DeviceWatchdog:
    """Calls `report(False)` while the device is stuck on dead work, `report(True)` after."""

    def __init__(self, guard: AbortGuard, stuck_seconds: float, report: Report) -> None:
        self._guard = guard
        self._stuck_seconds = stuck_seconds
        self._report = report
        self._interval = min(1.0, max(0.02, stuck_seconds / 5))
        self._task = BackgroundTask("atelier-device-watchdog", self._run)
        self.stuck = False

    def start(self) -> None:
        self._task.ensure_started()

    async def close(self) -> None:
        await self._task.stop()

    async def _run(self) -> None:
        watched = -1
        dead_since: float | None = None
        while True:
            await asyncio.sleep(self._interval)
            generation, items = self._guard.batch()
            if not items or not all(item.dead() for item in items):
                dead_since = None
            elif generation != watched or dead_since is None:
                watched, dead_since = generation, time.monotonic()
            stuck = dead_since is not None and time.monotonic() - dead_since >= self._stuck_seconds
            if stuck != self.stuck:
                self.stuck = stuck
                log.warning("inference device stuck on abandoned work" if stuck else "inference device free again",
                            extra={"stuck_seconds": self._stuck_seconds})
                try:
                    await self._report(not stuck)
                except Exception:  # a failed health update must not end the watchdog
                    log.exception("device watchdog could not report health")
