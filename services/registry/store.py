"""The object-store interface the registry is built on, and how to open one from settings.

Two implementations pass the same contract tests: `S3Store` (any S3-compatible service) and
`LocalStore` (a directory, for the embedded default). The registry needs only whole-object
puts/gets with two conditional writes (create-if-absent and replace-if-unchanged), streaming
reads, and sorted prefix listing, so every S3-compatible service can back it.

All methods are synchronous (boto3 is); async callers wrap them in `asyncio.to_thread`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from services.common.config import Settings
from services.common.errors import Unavailable

STREAM_CHUNK_BYTES = 1024 * 1024


class StoreError(Exception):
    """Base of the store-level errors; the registry turns them into domain errors."""


class ObjectNotFound(StoreError):
    """The key does not exist (or a conditional write's If-Match target is gone)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} not found")
        self.key = key


class PreconditionFailed(StoreError):
    """A conditional write lost: the key exists (If-None-Match) or changed (If-Match)."""

    def __init__(self, key: str, detail: str = "") -> None:
        super().__init__(f"conditional write to {key!r} failed" + (f": {detail}" if detail else ""))
        self.key = key


REGISTRY_UNAVAILABLE = "the registry is temporarily unavailable; retry later"


class StoreUnavailable(Unavailable, StoreError):
    """The store cannot be reached; maps straight to gRPC UNAVAILABLE with RetryInfo.

    Callers see one generic message: the store's endpoint, bucket and key layout are
    internals, so `detail` carries them to the server log only.
    """

    def __init__(self, detail: str, retry_after_seconds: float = 2.0) -> None:
        super().__init__(REGISTRY_UNAVAILABLE, retry_after_seconds, detail=detail)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: what garbage collection needs to decide (size, last-modified epoch)."""

    key: str
    size: int
    last_modified: float


@runtime_checkable
class ObjectStore(Protocol):
    """A flat key -> bytes store with conditional writes.

    Keys are '/'-separated relative paths without empty, '.' or '..' segments. An etag is
    an opaque string identifying one stored content of a key; it changes whenever the
    object is replaced, which is all that If-Match needs.
    """

    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        """Write `data` atomically and return the new etag.

        if_none_match: create only if the key does not exist, else PreconditionFailed.
        if_match: replace only if the current etag equals it, else PreconditionFailed
        (also when the key is missing).
        """
        ...

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """Return (content, etag); ObjectNotFound when absent."""
        ...

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        """Upload a file without reading it whole into memory (multipart when large)."""
        ...

    def download_file(self, key: str, dest_path: Path) -> None:
        """Write the object to `dest_path` (replaced atomically); ObjectNotFound when absent."""
        ...

    def open_stream(self, key: str) -> Iterator[bytes]:
        """Return an iterator over the object's bytes in chunks.

        ObjectNotFound is raised by this call itself, not on the first iteration.
        """
        ...

    def exists(self, key: str) -> bool:
        """True when the key exists."""
        ...

    def delete(self, key: str) -> None:
        """Remove the key; deleting a missing key is not an error."""
        ...

    def list_keys(self, prefix: str, *, start_after: str = "") -> Iterator[str]:
        """Yield every key starting with `prefix`, sorted, strictly after `start_after`."""
        ...

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        """Like `list_keys`, with each object's size and last-modified time (epoch seconds)."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and last-modified time of one key; ObjectNotFound when absent."""
        ...

    def touch(self, key: str) -> None:
        """Set the key's last-modified time to now without changing its content.

        Publishers touch a blob they reuse, so a garbage collection that saw it as old and
        unreferenced re-checks it, finds it young, and keeps it. ObjectNotFound when absent.
        """
        ...


def validate_key(key: str) -> str:
    """Refuse keys that could escape a directory or that S3 and a filesystem treat differently."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise ValueError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or part.startswith(".atelier"):
            raise ValueError(f"invalid object key {key!r}")
    return key


def write_atomically(dest: Path, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` to a unique `.<name>.<uuid>.part` beside `dest`, then rename it over `dest`.

    Readers see the old file or the complete new one, never a partial write; a failure
    while iterating (a lost connection, DataLoss from a verifying stream) leaves neither
    `dest` nor the `.part` behind, and concurrent writers of one `dest` each use their own
    `.part`, so the last complete rename wins. The one download path of the stores and blobs.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def open_store(settings: Settings) -> ObjectStore:
    """Build the store named by `settings.registry_url` (file://DIR or s3://BUCKET[/PREFIX])."""
    url = settings.registry_url
    if url.startswith("file://"):
        from services.registry.local import LocalStore

        return LocalStore(Path(url[len("file://") :]))
    if url.startswith("s3://"):
        from services.registry.s3 import S3Store

        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"registry_url {url!r} names no bucket")
        return S3Store(settings, bucket=bucket, prefix=prefix.strip("/"))
    raise ValueError(f"registry_url {url!r}: expected file://DIR or s3://BUCKET[/PREFIX]")
