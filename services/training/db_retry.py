"""Ride out a short database outage at the worker's fenced writes instead of failing the attempt.

Found by the chaos bench (row R4): a PostgreSQL restart that lands while a job is between
"training finished" and "version published" made `prepare_publish` raise, the attempt was
counted as failed, recording the failure raised too, and the job ran a second time after its
lease expired. Every write the worker retries here is fenced by ownership (see leases.py), so a
retry after the lease expired answers "not owned" and the worker stops as it would anyway; a
retry of a write that had in fact committed finds the row already moved on and is equally
harmless. The retry budget is the lease: past it, another worker may own the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import exc as sa_exc

T = TypeVar("T")
log = logging.getLogger(__name__)


def is_transient(error: BaseException) -> bool:
    """A lost or refused database connection (not a constraint, syntax or data error)."""
    if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return True
    return isinstance(error, sa_exc.DBAPIError) and bool(error.connection_invalidated)


def retry_transient(call: Callable[[], T], *, budget_s: float, what: str,
                    first_delay: float = 0.1, max_delay: float = 1.0) -> T:
    """`call()`, retried with capped exponential backoff while it fails transiently and the
    budget lasts; any other error, or the last transient one, propagates."""
    deadline = time.monotonic() + budget_s
    delay = first_delay
    while True:
        try:
            return call()
        except Exception as error:
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable; retrying", extra={"operation": what, "retry_in": delay})
        time.sleep(delay)
        delay = min(max_delay, delay * 2)
