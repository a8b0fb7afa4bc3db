"""`write_atomically`, the one download path of the local store, the S3 store and blobs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.registry.store import write_atomically


def _failing_after(first: bytes) -> Iterator[bytes]:
    yield first
    raise ConnectionError("the stream broke mid-write")


def test_failure_mid_write_leaves_no_final_file_and_no_part(tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "blob"
    with pytest.raises(ConnectionError):
        write_atomically(dest, _failing_after(b"half"))
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_failure_keeps_the_previous_content(tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    write_atomically(dest, [b"old"])
    with pytest.raises(ConnectionError):
        write_atomically(dest, _failing_after(b"new"))
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]


def test_concurrent_writers_of_one_dest_never_mix_contents(tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    contents = [bytes([i]) * 200_000 for i in range(8)]
    start = threading.Barrier(len(contents))

    def write(data: bytes) -> None:
        start.wait()
        write_atomically(dest, (data[i : i + 4096] for i in range(0, len(data), 4096)))

    threads = [threading.Thread(target=write, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.read_bytes() in contents
    assert [p.name for p in tmp_path.iterdir()] == ["blob"]
