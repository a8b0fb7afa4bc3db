"""Background work an object starts and stops with itself: a loop task or a daemon thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundTask:
    """`run()` as an asyncio task named `name`: started on demand, cancelled and awaited on stop.

    Both methods run on the event loop. `ensure_started` starts it again after it ended (a
    worker that crashed is replaced by the next caller that needs it).
    """

    def __init__(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self._name = name
        self._run = run
        self._task: asyncio.Task[None] | None = None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Cancel the task and wait for it to finish (its cancellation is not re-raised)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class DaemonThread:
    """`run()` in a named daemon thread, which runs until `stop` is set (run must watch it).

    `start` starts it once; `close` sets `stop`, joins the thread up to `timeout` seconds and
    forgets it (a later `start` runs `run` again, which finds `stop` set).
    """

    def __init__(self, name: str, run: Callable[[], None]) -> None:
        self.stop = threading.Event()
        self._name = name
        self._run = run
        self._thread: threading.Thread | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def close(self, timeout: float | None) -> None:
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
