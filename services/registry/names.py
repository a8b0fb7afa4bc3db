"""Name validation for everything that becomes part of an object key.

Names end up inside S3 keys and local paths, so a name that could traverse (`..`), nest
(`/`) or collide by case (`Upper` vs `upper` on a case-insensitive filesystem) is refused
with INVALID_ARGUMENT naming the caller's field, before any I/O happens.
"""

from __future__ import annotations

import re

from services.common.errors import InvalidInput

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9\-_.]{0,62}$")
NAME_RULE = "must match ^[a-z0-9][a-z0-9-_.]{0,62}$ (lowercase letters, digits, '-', '_', '.') without '..'"
ALIAS_RULE = NAME_RULE + "; 'latest' is reserved"
RESERVED_ALIASES = frozenset({"latest"})


def validate_name(value: str, field: str) -> str:
    """Return `value` if it is a valid registry name, else raise InvalidInput(field, ...)."""
    if not value:
        raise InvalidInput(field, "must not be empty")
    if len(value) > 63:
        raise InvalidInput(field, f"is {len(value)} characters long; at most 63 allowed")
    if ".." in value or not NAME_PATTERN.fullmatch(value):
        raise InvalidInput(field, NAME_RULE)
    return value


def validate_tenant(value: str, field: str = "tenant") -> str:
    """Tenants obey the name rule too: they are the first key segment under adapters/."""
    return validate_name(value, field)


def validate_alias(value: str, field: str = "alias") -> str:
    """Aliases are names; 'latest' is reserved because a bare reference already means it."""
    validate_name(value, field)
    if value in RESERVED_ALIASES:
        raise InvalidInput(field, ALIAS_RULE)
    return value


def validate_version(value: int, field: str = "version") -> int:
    """Versions are allocated from 1 upwards."""
    if value < 1:
        raise InvalidInput(field, "must be a version number >= 1")
    return value


def parse_base_ref(ref: str, field: str) -> tuple[str, int | None]:
    """'tiny-sd' -> ('tiny-sd', None) (newest version); 'tiny-sd@3' -> ('tiny-sd', 3).

    The one parser of base-model references: names cannot contain '@', so the split is
    unambiguous, and both halves are validated before any I/O.
    """
    name, sep, number = ref.partition("@")
    validate_name(name, field)
    if not sep:
        return name, None
    if not (number.isascii() and number.isdigit()) or len(number) > 10 or int(number) < 1:
        raise InvalidInput(field, f"{ref!r}: a version after '@' must be a number >= 1")
    return name, int(number)


def validate_base_ref(ref: str, field: str) -> str:
    """Return `ref` if it is a valid base-model reference (`name` or `name@N`)."""
    parse_base_ref(ref, field)
    return ref


def validate_relpath(value: str, field: str) -> str:
    """A relative '/'-separated file path inside a manifest (no traversal, no absolute path)."""
    if not value or value.startswith("/") or "\\" in value or "\0" in value:
        raise InvalidInput(field, f"{value!r} is not a relative path")
    if any(part in ("", ".", "..") for part in value.split("/")):
        raise InvalidInput(field, f"{value!r} must not contain empty, '.' or '..' segments")
    if len(value) > 512:
        raise InvalidInput(field, "path longer than 512 characters")
    return value
