"""API keys -> tenants, without a server (the interceptor is covered by integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.auth import Authenticator, current_tenant, parse_key_pairs, require_admin, tenant_scope
from services.common.config import Settings
from services.common.errors import InvalidInput, PermissionDenied, Unauthenticated


def settings(**kw: object) -> Settings:
    base: dict[str, object] = {"auth_enabled": True, "api_keys": "", "api_keys_file": None}
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


def test_parse_key_pairs_skips_blanks_and_comments() -> None:
    assert parse_key_pairs(["", " # c", " k1 = t1 ", "k2=t2"], "x") == {"k1": "t1", "k2": "t2"}


@pytest.mark.parametrize("entry", ["novalue", "=tenant", "key=", "key"])
def test_malformed_entries_are_refused(entry: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_key_pairs([entry], "api_keys")
    assert info.value.violations[0].field == "api_keys"


def test_keys_from_env_and_file_are_merged(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# secret\nfile-key=tenant-f\n")
    auth = Authenticator.from_settings(settings(api_keys="env-key=tenant-e", api_keys_file=keys_file))
    assert auth.authenticate("Bearer env-key") == "tenant-e"
    assert auth.authenticate("bearer file-key") == "tenant-f"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic k1", "k1", "Bearer k2", "Bearer k1x"])
def test_bad_headers_are_unauthenticated(header: str | None) -> None:
    auth = Authenticator({"k1": "t1"}, enabled=True)
    with pytest.raises(Unauthenticated):
        auth.authenticate(header)


def test_good_key_maps_to_its_tenant() -> None:
    auth = Authenticator({"k1": "t1", "k2": "t2"}, enabled=True)
    assert auth.authenticate("Bearer k2") == "t2"
    assert auth.tenant_for_key("k1") == "t1"
    assert auth.tenant_for_key("k") is None


def test_disabled_auth_uses_default_tenant() -> None:
    auth = Authenticator.from_settings(settings(auth_enabled=False, default_tenant="solo"))
    assert auth.authenticate(None) == "solo"
    assert auth.authenticate("Bearer whatever") == "solo"


def test_enabled_without_keys_is_a_configuration_error() -> None:
    with pytest.raises(InvalidInput):
        Authenticator.from_settings(settings())


def test_tenant_scope_for_non_rpc_code() -> None:
    assert current_tenant() == "default"
    with tenant_scope("worker-tenant"):
        assert current_tenant() == "worker-tenant"
    assert current_tenant() == "default"


def test_admins_are_the_configured_tenants_or_everyone_with_auth_off() -> None:
    auth = Authenticator.from_settings(settings(api_keys="k1=ops,k2=acme", admin_tenants=" ops , ,"))
    assert auth.admin_tenants == frozenset({"ops"})
    assert auth.is_admin("ops") and not auth.is_admin("acme") and not auth.is_admin("")
    assert Authenticator.from_settings(settings(auth_enabled=False)).is_admin("default")


def test_require_admin_fails_closed_outside_an_rpc() -> None:
    with pytest.raises(PermissionDenied, match="importing a base model needs an admin"):
        require_admin("importing a base model")
