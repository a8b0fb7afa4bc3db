"""The ObjectStore contract, run against the local directory store and a real S3 server."""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.config import Settings
from services.registry.local import LocalStore
from services.registry.store import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    StoreUnavailable,
    open_store,
)
from tests.fixtures.s3 import MotoServer, make_s3_settings

MiB = 1024 * 1024


@pytest.fixture
def store(registry_settings: Settings) -> ObjectStore:
    settings = registry_settings.model_copy(
        update={"s3_multipart_threshold_bytes": MiB, "s3_multipart_part_bytes": 5 * MiB}
    )
    return open_store(settings)


def test_put_get_roundtrip_and_etag_changes_with_content(store: ObjectStore) -> None:
    e1 = store.put_bytes("a/b.json", b"one")
    data, etag = store.get_bytes("a/b.json")
    assert (data, etag) == (b"one", e1)
    e2 = store.put_bytes("a/b.json", b"two")
    assert e2 != e1
    assert store.get_bytes("a/b.json") == (b"two", e2)


def test_if_none_match_creates_once(store: ObjectStore) -> None:
    store.put_bytes("k", b"first", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("k", b"second", if_none_match=True)
    assert store.get_bytes("k")[0] == b"first"


def test_if_match_replaces_only_unchanged(store: ObjectStore) -> None:
    etag = store.put_bytes("alias", b"v1")
    new = store.put_bytes("alias", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("alias", b"v3", if_match=etag)  # stale
    assert store.get_bytes("alias") == (b"v2", new)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("missing", b"x", if_match=etag)


def test_missing_keys(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.get_bytes("nope")
    with pytest.raises(ObjectNotFound):
        store.open_stream("nope")  # raised by the call, not on first iteration
    with pytest.raises(ObjectNotFound):
        store.download_file("nope", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not store.exists("nope")
    store.delete("nope")  # deleting a missing key is fine


def test_list_keys_sorted_with_prefix_and_start_after(store: ObjectStore) -> None:
    for key in ["d/foo/2", "d/foo/1", "d/fo.json", "d/foo-bar/1", "e/x", "d/g"]:
        store.put_bytes(key, b".")
    assert list(store.list_keys("d/fo")) == ["d/fo.json", "d/foo-bar/1", "d/foo/1", "d/foo/2"]
    assert list(store.list_keys("d/foo/")) == ["d/foo/1", "d/foo/2"]
    assert list(store.list_keys("d/", start_after="d/foo/1")) == ["d/foo/2", "d/g"]
    assert list(store.list_keys("zzz/")) == []
    store.delete("d/foo/1")
    assert list(store.list_keys("d/foo/")) == ["d/foo/2"]
    assert store.exists("d/g") and not store.exists("d/foo/1")


def test_list_keys_pages_past_one_listing_page(store: ObjectStore) -> None:
    keys = [f"many/{i:05d}" for i in range(1100)]  # S3 lists 1000 keys per page
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(k, b""), keys))
    assert list(store.list_keys("many/")) == keys


def test_large_file_streams_both_ways(store: ObjectStore, tmp_path: Path) -> None:
    """Above the (1 MiB test) threshold S3 uploads in 5 MiB parts; content survives intact."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB + 123))
    etag = store.put_file("blobs/big", src, if_none_match=True)
    if "s3" in repr(store).lower():
        assert etag.strip('"').endswith("-3"), f"expected a 3-part multipart upload, etag {etag}"
    with pytest.raises(PreconditionFailed):
        store.put_file("blobs/big", src, if_none_match=True)
    dest = tmp_path / "out" / "big.bin"
    store.download_file("blobs/big", dest)
    assert dest.read_bytes() == src.read_bytes()
    chunks = list(store.open_stream("blobs/big"))
    assert len(chunks) > 1 and b"".join(chunks) == src.read_bytes()


def test_small_file_put(store: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "small.bin"
    src.write_bytes(b"hello")
    store.put_file("s", src)
    assert store.get_bytes("s")[0] == b"hello"


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a/", "", ".atelier-tmp/x"])
def test_unsafe_keys_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError):
        store.put_bytes(key, b"x")


def test_concurrent_creates_have_one_winner(store: ObjectStore) -> None:
    def create(i: int) -> bool:
        try:
            store.put_bytes("race/one", str(i).encode(), if_none_match=True)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert store.get_bytes("race/one")[0] == str(winner).encode()


def test_concurrent_compare_and_swap_has_one_winner(store: ObjectStore) -> None:
    etag = store.put_bytes("race/cas", b"start")

    def swap(i: int) -> bool:
        try:
            store.put_bytes("race/cas", str(i).encode(), if_match=etag)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(swap, range(8)))
    assert results.count(True) == 1
    assert store.get_bytes("race/cas")[0] == str(results.index(True)).encode()


def _create_in_process(root: str, i: int) -> bool:
    try:
        LocalStore(Path(root)).put_bytes("proc/one", str(i).encode(), if_none_match=True)
        return True
    except PreconditionFailed:
        return False


def _cas_in_process(root: str, etag: str, i: int) -> bool:
    try:
        LocalStore(Path(root)).put_bytes("proc/cas", str(i).encode(), if_match=etag)
        return True
    except PreconditionFailed:
        return False


def test_local_store_conditional_writes_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    etag = LocalStore(root).put_bytes("proc/cas", b"start")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        created = pool.starmap(_create_in_process, [(str(root), i) for i in range(4)])
        swapped = pool.starmap(_cas_in_process, [(str(root), etag, i) for i in range(4)])
    assert created.count(True) == 1
    assert swapped.count(True) == 1


def test_s3_down_is_store_unavailable(tmp_path: Path) -> None:
    server = MotoServer()
    server.start()
    settings = make_s3_settings(server.endpoint, server.create_bucket(), s3_connect_timeout_seconds=0.5)
    store = open_store(settings)
    store.put_bytes("k", b"v")
    server.stop()
    for call in (lambda: store.get_bytes("k"), lambda: store.put_bytes("k", b"x"), lambda: list(store.list_keys(""))):
        with pytest.raises(StoreUnavailable) as err:
            call()
        assert err.value.retry_after_seconds > 0


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store(Settings(registry_url=f"file://{tmp_path}/r")), LocalStore)
    for bad in ("s3://", "http://x", "r"):
        with pytest.raises(ValueError):
            open_store(Settings(registry_url=bad))


def test_stat_list_objects_and_touch(store: ObjectStore) -> None:
    store.put_bytes("g/a", b"12345")
    store.put_bytes("g/b", b"1")
    before = store.stat("g/a")
    assert (before.key, before.size) == ("g/a", 5) and abs(before.last_modified - time.time()) < 120
    assert [(i.key, i.size) for i in store.list_objects("g/")] == [("g/a", 5), ("g/b", 1)]
    time.sleep(1.1)  # S3 Last-Modified has one-second resolution
    store.touch("g/a")
    after = store.stat("g/a")
    assert after.last_modified > before.last_modified and store.get_bytes("g/a")[0] == b"12345"
    with pytest.raises(ObjectNotFound):
        store.stat("g/missing")
    with pytest.raises(ObjectNotFound):
        store.touch("g/missing")
