"""retry_transient: lost connections are retried within the budget, anything else is not."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import exc as sa_exc

from services.training.db_retry import is_transient, retry_transient


def _refused() -> sa_exc.OperationalError:
    return sa_exc.OperationalError("SELECT 1", {}, OSError("connection refused"))


def test_a_refused_connection_is_retried_until_it_answers() -> None:
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise _refused()
        return "ok"

    assert retry_transient(flaky, budget_s=5, what="test", first_delay=0.01) == "ok"
    assert len(calls) == 3


def test_the_budget_bounds_the_wait_and_the_last_error_propagates() -> None:
    started = time.monotonic()
    with pytest.raises(sa_exc.OperationalError):
        retry_transient(lambda: (_ for _ in ()).throw(_refused()), budget_s=0.3, what="test", first_delay=0.05)
    assert time.monotonic() - started < 2


def test_non_transient_errors_are_not_retried() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise sa_exc.IntegrityError("INSERT", {}, ValueError("duplicate key"))

    with pytest.raises(sa_exc.IntegrityError):
        retry_transient(broken, budget_s=5, what="test")
    assert calls == [1]
    assert is_transient(_refused()) and not is_transient(ValueError("x"))
