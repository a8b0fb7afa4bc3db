"""Content-addressed blobs: blobs/sha256/<hex>, immutable, verified on every read.

Uploads hash the file in a streaming pass first and then upload it under its digest with
If-None-Match, so identical content is stored once and two uploaders of the same bytes
cannot conflict. Reads hash while streaming; a mismatch raises DataLoss and nothing that
was read is returned or left at the destination.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

from services.common.errors import DataLoss, InvalidInput, NotFound
from services.registry.keys import Keys
from services.registry.manifests import FileRecord
from services.registry.store import (
    STREAM_CHUNK_BYTES,
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    write_atomically,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class Blobs:
    """Put and get blobs by sha256 in one object store."""

    def __init__(self, store: ObjectStore, keys: Keys) -> None:
        self._store = store
        self._keys = keys

    def put_file(self, path: Path, logical_path: str = "") -> FileRecord:
        """Store a file's bytes as a blob; returns the record (path defaults to the file name)."""
        sha, size = sha256_file(path)
        key = self._keys.blob(sha)
        if not self._reuse(key):
            # PreconditionFailed: a concurrent uploader stored the same content first.
            with contextlib.suppress(PreconditionFailed):
                self._store.put_file(key, path, if_none_match=True)
        return FileRecord(path=logical_path or path.name, sha256=sha, size=size)

    def _reuse(self, key: str) -> bool:
        """True when the blob is already stored; its last-modified time is renewed.

        The touch is what keeps garbage collection from sweeping an old, so far unreferenced
        blob that this publish is about to reference (see services/registry/gc.py).
        """
        if not self._store.exists(key):
            return False
        try:
            self._store.touch(key)
        except ObjectNotFound:
            return False  # collected between the two calls: upload it again
        return True

    def put_bytes(self, data: bytes, logical_path: str = "") -> FileRecord:
        """Store small in-memory content as a blob."""
        sha = hashlib.sha256(data).hexdigest()
        key = self._keys.blob(sha)
        if not self._reuse(key):
            with contextlib.suppress(PreconditionFailed):
                self._store.put_bytes(key, data, if_none_match=True)
        return FileRecord(path=logical_path or sha, sha256=sha, size=len(data))

    def exists(self, sha256: str) -> bool:
        """True when the blob is in the store."""
        return self._store.exists(self._keys.blob(_check_sha(sha256)))

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, verified; DataLoss on mismatch, NotFound when missing."""
        key = self._keys.blob(_check_sha(sha256))
        try:
            data, _ = self._store.get_bytes(key)
        except ObjectNotFound:
            raise NotFound("blob", sha256) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DataLoss(f"blob {sha256} is corrupted in the store (content hashes to {actual})")
        return data

    def stream(self, sha256: str) -> Iterator[bytes]:
        """Yield the blob's chunks; raises DataLoss after the last chunk if the digest differs.

        Only for callers that can discard what they received (e.g. into a temp file);
        use `download` to get a verified file.
        """
        key = self._keys.blob(_check_sha(sha256))
        try:
            chunks = self._store.open_stream(key)
        except ObjectNotFound:
            raise NotFound("blob", sha256) from None
        h = hashlib.sha256()
        for chunk in chunks:
            h.update(chunk)
            yield chunk
        if h.hexdigest() != sha256:
            raise DataLoss(f"blob {sha256} is corrupted in the store (content hashes to {h.hexdigest()})")

    def download(self, sha256: str, dest: Path) -> Path:
        """Write the verified blob to `dest` atomically; on DataLoss nothing is left at dest."""
        return write_atomically(dest, self.stream(sha256))

    def download_record(self, record: FileRecord, dest: Path) -> Path:
        """Download a manifest file, also checking its recorded size."""
        self.download(record.sha256, dest)
        if dest.stat().st_size != record.size:
            dest.unlink(missing_ok=True)
            raise DataLoss(f"file {record.path!r}: size differs from its manifest")
        return dest


def _check_sha(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise InvalidInput("sha256", "must be 64 lowercase hex characters")
    return sha256
