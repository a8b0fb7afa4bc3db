"""Typed domain errors.

Domain modules raise these; only `services.common.error_mapping` turns them into gRPC
status codes with google.rpc details, so no domain module imports grpc for its errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


class AtelierError(Exception):
    """Base of every error the API reports to a caller on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class _Violation:
    """One thing wrong with a call: `subject` names what (a field, a quota's holder), `description` why."""

    subject: str
    description: str


class FieldViolation(_Violation):
    """A bad request field: a BadRequest field violation; `field` is its path (`spec.lora.rank`)."""

    @property
    def field(self) -> str:
        return self.subject


class InvalidInput(AtelierError):
    """The request is malformed: maps to INVALID_ARGUMENT with BadRequest field violations."""

    def __init__(self, field_name: str, description: str, *more: FieldViolation) -> None:
        super().__init__(f"{field_name}: {description}")
        self.violations: list[FieldViolation] = [FieldViolation(field_name, description), *more]


class Violations:
    """Collects the field violations of one request; `raise_if_any` raises one InvalidInput
    listing all of them, so a client fixes every bad field in one round trip."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> None:
        """Add the violation unless `ok`."""
        if not ok:
            self.add(field, description)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Run a check that raises InvalidInput, keeping its violations instead of raising."""
        try:
            yield
        except InvalidInput as exc:
            self.items.extend(exc.violations)

    def raise_if_any(self) -> None:
        if self.items:
            first, *more = self.items
            raise InvalidInput(first.field, first.description, *more)


class _NamedResource:
    """What NotFound and AlreadyExists share: the resource their ResourceInfo detail names.

    A mixin, not an AtelierError, so every error class stays one mapped status code.
    """

    outcome = ""  # the default message's ending: "<type> '<name>' <outcome>"

    def __init__(self, resource_type: str, resource_name: str, description: str = "") -> None:
        message = description or f"{resource_type} {resource_name!r} {self.outcome}"
        super().__init__(message)  # type: ignore[call-arg]  # AtelierError, next in the MRO
        self.resource_type = resource_type
        self.resource_name = resource_name


class NotFound(_NamedResource, AtelierError):
    """The named resource does not exist in the caller's tenant: NOT_FOUND with ResourceInfo."""

    outcome = "not found"


class AdapterNotFound(NotFound):
    def __init__(self, ref: str) -> None:
        super().__init__("adapter", ref)


class AlreadyExists(_NamedResource, AtelierError):
    """A create lost to an existing resource: ALREADY_EXISTS with ResourceInfo."""

    outcome = "already exists"


class FailedPrecondition(AtelierError):
    """The system is not in a state that allows the call (lost CAS, wrong base model)."""

    def __init__(self, message: str, field_name: str = "") -> None:
        super().__init__(message)
        self.field_name = field_name


class PreconditionConflict(FailedPrecondition):
    """A compare-and-swap lost to a concurrent writer."""


class DataLoss(AtelierError):
    """Stored bytes do not match their digest; never return or apply them."""


class Unavailable(AtelierError):
    """A dependency (object store, database) cannot be reached: UNAVAILABLE with RetryInfo.

    `detail` is for the server log only (endpoints, buckets, keys): callers get `message`.
    """

    def __init__(self, message: str, retry_after_seconds: float = 1.0, *, detail: str = "") -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.detail = detail


class QuotaViolation(_Violation):
    """One exceeded quota: `subject` names who (`tenant:<t>`), `description` what and the limit."""


class ResourceExhausted(AtelierError):
    """A bounded queue or quota is full: RESOURCE_EXHAUSTED with RetryInfo (+ QuotaFailure
    when `violations` name the exceeded quotas)."""

    def __init__(self, message: str, retry_after_seconds: float = 1.0,
                 violations: tuple[QuotaViolation, ...] = ()) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.violations = violations


class QuotaExceeded(ResourceExhausted):
    """A per-tenant quota or rate limit refused the call (never a silent drop)."""

    def __init__(self, tenant: str, description: str, retry_after_seconds: float) -> None:
        super().__init__(f"quota exceeded for tenant {tenant!r}: {description}", retry_after_seconds,
                         (QuotaViolation(f"tenant:{tenant}", description),))


class Unauthenticated(AtelierError):
    """No or unknown API key."""


class PermissionDenied(AtelierError):
    """Authenticated, but not allowed."""


class Cancelled(AtelierError):
    """The caller cancelled or its deadline passed while the work was in progress."""


class DeadlineExceeded(AtelierError):
    """The request's deadline expired before the work finished."""
