"""One named background coroutine an object runs on the event loop, and stops with it."""

from __future__ import annotations

import asyncio
import contextlib
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
