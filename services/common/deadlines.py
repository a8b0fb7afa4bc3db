"""The caller's gRPC deadline, visible to code far below the servicer (the object store).

A hung dependency must not eat the whole deadline: the caller would then see
DEADLINE_EXCEEDED (which says "your budget was too small") instead of UNAVAILABLE (which says
"a dependency is down, retry later"). botocore's timeouts are fixed per client, so the store
asks `remaining_seconds()` before each call and stops waiting when the budget, minus a margin
for the answer to travel back, is spent.

`DeadlineInterceptor` sets the deadline for every RPC. Context variables follow
`asyncio.to_thread` and `contextvars.copy_context().run`, which is how handler work reaches
worker threads; code outside an RPC (the training worker) has no deadline.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar

import grpc
from grpc import aio

from services.common.interceptors import GuardInterceptor

_deadline: ContextVar[float | None] = ContextVar("atelier_call_deadline", default=None)


def remaining_seconds() -> float | None:
    """Seconds left before the current RPC's deadline (may be <= 0); None without a deadline."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


@contextmanager
def deadline_scope(seconds: float | None) -> Iterator[None]:
    """Run a block as if inside an RPC with `seconds` left (scripts, tests); None: no deadline."""
    token = _deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


class DeadlineInterceptor(GuardInterceptor):
    """Publishes `context.time_remaining()` as a monotonic deadline for the RPC's task."""

    @asynccontextmanager
    async def guard(self, details: grpc.HandlerCallDetails,
                    context: aio.ServicerContext) -> AsyncIterator[None]:
        left = context.time_remaining()
        token = _deadline.set(None if left is None else time.monotonic() + left)
        try:
            yield
        finally:
            with suppress(ValueError):  # a stream finished in another context: nothing to restore
                _deadline.reset(token)


__all__ = ["DeadlineInterceptor", "deadline_scope", "remaining_seconds"]
