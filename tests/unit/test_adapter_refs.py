"""AdapterRef: the one parsed adapter reference (services/registry/refs.py)."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidInput
from services.registry.refs import AdapterRef


def test_parse_text_forms() -> None:
    assert AdapterRef.parse("style", "acme", "f") == AdapterRef("acme", "style")
    assert AdapterRef.parse("style-1@3", "acme", "f") == AdapterRef("acme", "style-1", version=3)
    assert AdapterRef.parse("style.v2:prod", "acme", "f") == AdapterRef("acme", "style.v2", alias="prod")


@pytest.mark.parametrize("bad", ["", "Style", "x@0", "x@", "x@1:prod", "x:", "x:Prod", "a/b", "x@-1", " x"])
def test_parse_refuses_bad_text(bad: str) -> None:
    with pytest.raises(InvalidInput) as info:
        AdapterRef.parse(bad, "acme", "settings.x")
    assert info.value.violations[0].field == "settings.x"
    assert "NAME[@VERSION|:ALIAS]" in info.value.violations[0].description


def test_equal_refs_are_one_cache_key() -> None:
    cache = {AdapterRef("acme", "cat", alias="prod"): 1}
    assert cache[AdapterRef("acme", "cat", None, "prod")] == 1
    assert AdapterRef("other", "cat", alias="prod") not in cache  # the tenant is part of the key
    assert AdapterRef("acme", "cat") not in cache and AdapterRef("acme", "cat", version=1) not in cache
    with pytest.raises(AttributeError):
        AdapterRef("acme", "cat").name = "dog"  # type: ignore[misc]


def test_str_and_pinned() -> None:
    assert str(AdapterRef("acme", "cat", version=3)) == "cat@3"
    assert str(AdapterRef("acme", "cat", alias="prod")) == "cat:prod"
    assert str(AdapterRef("acme", "cat")) == "cat"
    assert AdapterRef("acme", "cat", version=3).pinned
    assert not AdapterRef("acme", "cat", alias="prod").pinned and not AdapterRef("acme", "cat").pinned
