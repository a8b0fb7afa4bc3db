"""Reading and writing JSON documents (manifests, aliases) and paging through listings."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from services.common.errors import DataLoss, InvalidInput
from services.registry.store import ObjectStore, PreconditionFailed

T = TypeVar("T", bound=BaseModel)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def read_doc(store: ObjectStore, key: str, model: type[T]) -> tuple[T, str, str]:
    """(document, etag, sha256 of its bytes); ObjectNotFound passes through.

    A document that does not parse was damaged in the store: DataLoss, never a guess.
    """
    data, etag = store.get_bytes(key)
    try:
        doc = model.model_validate_json(data)
    except ValidationError as exc:
        raise DataLoss(f"stored document {key!r} is malformed: {exc.error_count()} error(s)") from None
    return doc, etag, hashlib.sha256(data).hexdigest()


def put_if_absent(store: ObjectStore, key: str, data: bytes) -> bool:
    """Create `key` with If-None-Match: True when this call wrote it, False when it existed."""
    try:
        store.put_bytes(key, data, if_none_match=True)
    except PreconditionFailed:
        return False
    return True


def checked_page_size(requested: int, field: str = "page_size", maximum: int = MAX_PAGE_SIZE) -> int:
    """0 means the default; negative is a caller error; values above `maximum` are capped.

    The one page-size rule of every listing (the registry's, and the training job store's).
    """
    if requested < 0:
        raise InvalidInput(field, "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, maximum)


def encode_token(scope: str, after: str) -> str:
    """An opaque page token: where the next page starts, bound to what is being listed."""
    raw = json.dumps({"s": scope, "a": after}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, scope: str, field: str = "page_token") -> str:
    """The position encoded by `encode_token`; "" for the first page."""
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        if data["s"] != scope or not isinstance(data["a"], str):
            raise ValueError
        return str(data["a"])
    except (ValueError, KeyError, TypeError):
        raise InvalidInput(field, "is not a token returned by this listing") from None
