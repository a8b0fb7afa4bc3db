"""Exponential backoff with jitter for UNAVAILABLE and RESOURCE_EXHAUSTED, honouring RetryInfo.

Only those two codes are retried: they mean "nothing happened, try later". Every request the
SDK retries is safe to repeat (reads, Generate, CreateTrainingJob with its request id).

A wait is never shorter than the server's RetryInfo delay, and RESOURCE_EXHAUSTED (load
shedding) is never retried sooner than `resource_exhausted_floor_seconds`, whatever the policy
says: clients hammering a full queue every few milliseconds cost the server more than the
work they wait for. When the server's delay (or the floor) decides, the wait is jittered
upwards only, so clients told the same delay do not all come back at the same instant.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from atelier.errors import ResourceExhaustedError, RetryableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    multiplier: float = 2.0
    # Each delay is drawn from [base * (1 - jitter), base * (1 + jitter)].
    jitter: float = 0.5
    # The shortest wait after RESOURCE_EXHAUSTED, even when the server sent no RetryInfo.
    resource_exhausted_floor_seconds: float = 0.25
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, server_hint: float | None, floor: float = 0.0) -> float:
        """Seconds to wait before attempt `attempt + 1`; never less than the server asked or `floor`."""
        base = min(self.max_backoff_seconds, self.initial_backoff_seconds * self.multiplier ** (attempt - 1))
        drawn = self.rng.uniform(base * (1 - self.jitter), base * (1 + self.jitter))
        wanted = max(server_hint or 0.0, floor)
        if wanted > drawn:
            return wanted * self.rng.uniform(1.0, 1.0 + self.jitter / 2)
        return drawn


NO_RETRY = RetryPolicy(max_attempts=1)


def _should_retry(error: RetryableError, attempt: int, policy: RetryPolicy, deadline: float) -> float | None:
    if attempt >= policy.max_attempts:
        return None
    floor = policy.resource_exhausted_floor_seconds if isinstance(error, ResourceExhaustedError) else 0.0
    wait = policy.delay(attempt, error.retry_delay_seconds, floor)
    if time.monotonic() + wait >= deadline:
        return None
    return wait


def call_with_retry(fn: Callable[[float], T], policy: RetryPolicy, total_timeout: float) -> T:
    """Call fn(remaining_seconds) until it succeeds, fails for good, or time runs out."""
    deadline = time.monotonic() + total_timeout
    attempt = 1
    while True:
        try:
            return fn(max(0.001, deadline - time.monotonic()))
        except RetryableError as error:
            wait = _should_retry(error, attempt, policy, deadline)
            if wait is None:
                raise
            time.sleep(wait)
            attempt += 1


async def call_with_retry_async(
    fn: Callable[[float], Awaitable[T]], policy: RetryPolicy, total_timeout: float
) -> T:
    """The asyncio twin of call_with_retry."""
    import asyncio

    deadline = time.monotonic() + total_timeout
    attempt = 1
    while True:
        try:
            return await fn(max(0.001, deadline - time.monotonic()))
        except RetryableError as error:
            wait = _should_retry(error, attempt, policy, deadline)
            if wait is None:
                raise
            await asyncio.sleep(wait)
            attempt += 1
