"""A directory as an object store, for the embedded default and for tests.

Writes go to a temp file in <root>/.atelier-tmp, are fsynced, then moved into place:
`os.link` for If-None-Match (fails atomically when the key exists) and `os.replace`
otherwise, so readers see the old or the new content, never a partial file. If-Match and
every other mutation run under an `fcntl.flock` on one of 256 lock-stripe files, which
serialises writers of a key across threads and processes alike (each call opens its own
descriptor, and flock locks belong to the open file description). The etag of an object
is the sha256 of its content.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from services.registry.store import (
    STREAM_CHUNK_BYTES,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    validate_key,
    write_atomically,
)

_TMP = ".atelier-tmp"
_LOCKS = ".atelier-locks"


class LocalStore:
    """ObjectStore over a directory tree: key 'a/b/c' is file <root>/a/b/c."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / _TMP).mkdir(parents=True, exist_ok=True)
        (self.root / _LOCKS).mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # --- helpers ------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        stripe = hashlib.sha256(key.encode()).hexdigest()[:2]
        fd = os.open(self.root / _LOCKS / f"{stripe}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _temp_from_chunks(self, chunks: Iterator[bytes]) -> tuple[Path, str]:
        """Write chunks to a fresh temp file, fsync it; returns (path, sha256)."""
        tmp = self.root / _TMP / uuid.uuid4().hex
        h = hashlib.sha256()
        try:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, h.hexdigest()

    def _install(self, key: str, tmp: Path, etag: str, if_none_match: bool, if_match: str | None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._lock(key):
                if if_none_match:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        raise PreconditionFailed(key, "object exists") from None
                    return etag
                if if_match is not None and self._etag(path) != if_match:
                    raise PreconditionFailed(key, "etag differs")
                os.replace(tmp, path)
                return etag
        finally:
            tmp.unlink(missing_ok=True)

    def _etag(self, path: Path) -> str | None:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(STREAM_CHUNK_BYTES):
                    h.update(chunk)
        except (FileNotFoundError, IsADirectoryError):
            return None
        return h.hexdigest()

    # --- ObjectStore --------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        validate_key(key)
        tmp, etag = self._temp_from_chunks(iter([data]))
        return self._install(key, tmp, etag, if_none_match, if_match)

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        try:
            data = self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return data, hashlib.sha256(data).hexdigest()

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        validate_key(key)
        with open(path, "rb") as f:
            tmp, etag = self._temp_from_chunks(iter(lambda: f.read(STREAM_CHUNK_BYTES), b""))
        return self._install(key, tmp, etag, if_none_match, None)

    def download_file(self, key: str, dest_path: Path) -> None:
        write_atomically(dest_path, self.open_stream(key))

    def open_stream(self, key: str) -> Iterator[bytes]:
        try:
            f = open(self._path(key), "rb")  # noqa: SIM115 - closed by the generator
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return _chunks(f)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._lock(key):
            path.unlink(missing_ok=True)

    def list_keys(self, prefix: str, *, start_after: str = "") -> Iterator[str]:
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if not d.startswith(".atelier")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                key = filename if rel_dir == "." else f"{rel_dir}/{filename}"
                if key.startswith(prefix) and key > start_after:
                    found.append(key)
        return iter(sorted(found))

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        for key in self.list_keys(prefix):
            try:
                yield self.stat(key)
            except ObjectNotFound:
                continue  # deleted while listing

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def touch(self, key: str) -> None:
        try:
            os.utime(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(STREAM_CHUNK_BYTES):
            yield chunk
