"""What an adapter reference means: the one parsed form every layer passes around.

A request names an adapter version as NAME (the newest version), NAME@VERSION or NAME:ALIAS,
always inside the caller's tenant. The edges build an `AdapterRef` once — the servicers from
the proto message plus the authenticated tenant, warm start from its setting text — and
everything after (registry resolution, the inference resolver's cache) takes it as it is.
Resolving one gives a manifest; its pinned form (tenant, name, version, manifest digest) is
inference's `AdapterKey` (services/inference/adapters.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.common.errors import InvalidInput
from services.registry.names import NAME_PATTERN

_NAME = NAME_PATTERN.pattern.removeprefix("^").removesuffix("$")
_TEXT = re.compile(rf"(?P<name>{_NAME})(?:@(?P<version>[0-9]+)|:(?P<alias>{_NAME}))?")
TEXT_FORM = "NAME[@VERSION|:ALIAS]"


@dataclass(frozen=True)
class AdapterRef:
    """A parsed adapter reference: `version`, `alias`, or neither (the newest version).

    Frozen and hashable: equal references are one cache key (inference's Resolver).
    """

    tenant: str
    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, text: str, tenant: str, field: str) -> AdapterRef:
        """`style`, `style@3` or `style:prod` in `tenant`; InvalidInput(field) otherwise.

        Syntax only (a version >= 1, names of the registry's shape); the registry validates
        the parts again before any I/O.
        """
        match = _TEXT.fullmatch(text)
        version = int(match["version"]) if match and match["version"] else None
        if match is None or version == 0:
            raise InvalidInput(field, f"{text!r} is not {TEXT_FORM}")
        return cls(tenant, match["name"], version, match["alias"])

    @property
    def pinned(self) -> bool:
        """A version number: its manifest never changes (an alias or latest can move)."""
        return self.version is not None

    def __str__(self) -> str:
        """How messages name it: name@3, name:prod or plain name (the tenant is the caller's)."""
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name
