"""Exponential backoff with jitter for UNAVAILABLE and RESOURCE_EXHAUSTED, honouring RetryInfo.

Only those two codes are retried: they mean "nothing happened, try later". Every request the
SDK retries is safe to repeat (reads, Generate, CreateTrainingJob with its request id).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from atelier.errors import RetryableError

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    multiplier: float = 2.0
    # Each delay is drawn from [base * (1 - jitter), base * (1 + jitter)].
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int, server_hint: float | None) -> float:
        """Seconds to wait before attempt `attempt + 1`; never less than the server asked."""
        base = min(self.max_backoff_seconds, self.initial_backoff_seconds * self.multiplier ** (attempt - 1))
        drawn = self.rng.uniform(base * (1 - self.jitter), base * (1 + self.jitter))
        return max(drawn, server_hint or 0.0)


NO_RETRY = RetryPolicy(max_attempts=1)


def _should_retry(error: RetryableError, attempt: int, policy: RetryPolicy, deadline: float) -> float | None:
    if attempt >= policy.max_attempts:
        return None
    wait = policy.delay(attempt, error.retry_delay_seconds)
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
