"""API-key authentication: `authorization: Bearer <key>` -> tenant.

Keys come from `ATELIER_API_KEYS` ("key=tenant,key=tenant") and/or `ATELIER_API_KEYS_FILE`
(one `key=tenant` per line, `#` comments; a mounted Kubernetes Secret). With auth switched
off (embedded default) every call belongs to `default_tenant`. Keys are compared in
constant time against every configured key so response timing reveals nothing about
which prefix matched. Health and reflection stay open so Kubernetes probes and grpcurl work.
Tenants named by `ATELIER_ADMIN_TENANTS` are admins (they may change shared resources such
as base models); with auth off the single default tenant is an admin.

Servicers read the caller's tenant with `current_tenant()`; the interceptor sets it inside
the wrapped behaviour, i.e. in the very task and context that runs the servicer code.
"""

from __future__ import annotations

import contextvars
import hmac
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path

import grpc
from grpc import aio

from services.common.config import Settings
from services.common.errors import InvalidInput, PermissionDenied, Unauthenticated
from services.common.interceptors import GuardInterceptor, is_infrastructure_method, metadata_value

AUTHORIZATION_KEY = "authorization"

DEFAULT_TENANT = "default"

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("atelier_tenant", default=DEFAULT_TENANT)
# Fail closed: only the auth interceptor grants admin rights, so an RPC path that somehow
# skipped it can never change shared resources.
_admin: contextvars.ContextVar[bool] = contextvars.ContextVar("atelier_admin", default=False)


def current_tenant() -> str:
    """The calling tenant inside a servicer method (settings.default_tenant when auth is off).

    Outside an RPC it is "default" unless code runs inside `tenant_scope(...)`.
    """
    return _tenant.get()


def require_admin(action: str) -> None:
    """PermissionDenied unless the calling tenant is an admin (see the module docstring)."""
    if not _admin.get():
        raise PermissionDenied(f"{action} needs an admin API key; tenant {current_tenant()!r} is not an admin")


def parse_tenants(spec: str) -> frozenset[str]:
    """'a, b' -> {'a', 'b'} (blank entries skipped)."""
    return frozenset(part.strip() for part in spec.split(",") if part.strip())


@contextmanager
def tenant_scope(tenant: str) -> Iterator[None]:
    """Run non-RPC code (a worker, a script, a test) as `tenant`."""
    token = _tenant.set(tenant)
    try:
        yield
    finally:
        _tenant.reset(token)


def parse_key_pairs(lines: Iterable[str], source: str) -> dict[str, str]:
    """Parse `key=tenant` entries; blank entries and `#` comments are skipped."""
    keys: dict[str, str] = {}
    for raw in lines:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        key, sep, tenant = entry.partition("=")
        key, tenant = key.strip(), tenant.strip()
        if not sep or not key or not tenant:
            raise InvalidInput(source, "each entry must look like key=tenant")
        keys[key] = tenant
    return keys


class Authenticator:
    """Maps API keys to tenants. Built once per process from settings."""

    def __init__(self, keys: dict[str, str], enabled: bool, default_tenant: str = DEFAULT_TENANT,
                 admin_tenants: frozenset[str] = frozenset()) -> None:
        if enabled and not keys:
            raise InvalidInput("api_keys", "auth is enabled but no API keys are configured")
        self._keys = [(k.encode(), t) for k, t in keys.items()]
        self.enabled = enabled
        self.default_tenant = default_tenant
        self.admin_tenants = admin_tenants

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        keys = parse_key_pairs(settings.api_keys.split(","), "api_keys")
        if settings.api_keys_file is not None:
            text = Path(settings.api_keys_file).read_text(encoding="utf-8")
            keys.update(parse_key_pairs(text.splitlines(), "api_keys_file"))
        return cls(keys, settings.auth_enabled, settings.default_tenant, parse_tenants(settings.admin_tenants))

    def tenant_for_key(self, key: str) -> str | None:
        """Tenant of `key`, or None. Every configured key is compared, in constant time."""
        candidate = key.encode()
        found: str | None = None
        for known, tenant in self._keys:
            if hmac.compare_digest(known, candidate):
                found = tenant
        return found

    def authenticate(self, authorization: str | None) -> str:
        """Tenant for an `authorization` header value; raises Unauthenticated otherwise."""
        if not self.enabled:
            return self.default_tenant
        if not authorization:
            raise Unauthenticated("missing `authorization: Bearer <api key>` metadata")
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <api key>`")
        tenant = self.tenant_for_key(key.strip())
        if tenant is None:
            raise Unauthenticated("unknown API key")
        return tenant

    def is_admin(self, tenant: str) -> bool:
        """Auth off: one trusted caller, the admin. Auth on: only the configured admin tenants."""
        return not self.enabled or tenant in self.admin_tenants


class AuthInterceptor(GuardInterceptor):
    """Rejects unauthenticated calls and publishes the tenant to `current_tenant()`.

    It raises `Unauthenticated`; the error-mapping interceptor (outside this one) turns it
    into UNAUTHENTICATED, so the metrics and logs see the rejection like any other error.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def applies_to(self, method: str) -> bool:
        return not is_infrastructure_method(method)

    @asynccontextmanager
    async def guard(self, details: grpc.HandlerCallDetails,
                    context: aio.ServicerContext) -> AsyncIterator[None]:
        tenant = self.authenticator.authenticate(metadata_value(context, AUTHORIZATION_KEY))
        token = _tenant.set(tenant)
        admin = _admin.set(self.authenticator.is_admin(tenant))
        try:
            yield
        finally:
            with suppress(ValueError):
                _admin.reset(admin)
            with suppress(ValueError):
                _tenant.reset(token)
