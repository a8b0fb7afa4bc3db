"""Registry contract (blobs, adapter versions, aliases, listing), over local and S3 stores."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.errors import (
    AdapterNotFound,
    DataLoss,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    PreconditionConflict,
)
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.registry.store import open_store
from tests.fixtures.s3 import write_lora, write_ti


@pytest.fixture
def registry(registry_settings: Settings) -> Registry:
    return Registry(open_store(registry_settings), prefix="t")


def publish(registry: Registry, tmp_path: Path, name: str = "cat", tenant: str = "acme", seed: int = 0,
            base_model: str = "tiny", **kw: object) -> object:
    lora = write_lora(tmp_path / f"lora-{name}-{seed}.safetensors", seed=seed)
    return registry.adapters.publish(tenant, name, kind="LORA", base_model=base_model,
                                    files={LORA_WEIGHTS_FILE: lora}, **kw)  # type: ignore[arg-type]


# --- blobs ------------------------------------------------------------------------------
def test_blobs_are_content_addressed_and_verified(registry: Registry, tmp_path: Path) -> None:
    src = tmp_path / "x.bin"
    src.write_bytes(b"payload" * 1000)
    record = registry.blobs.put_file(src)
    assert record.sha256 == hashlib.sha256(src.read_bytes()).hexdigest() and record.size == 7000
    assert registry.blobs.put_bytes(src.read_bytes()).sha256 == record.sha256  # stored once
    assert registry.blobs.read(record.sha256) == src.read_bytes()
    out = registry.blobs.download(record.sha256, tmp_path / "dl" / "x.bin")
    assert out.read_bytes() == src.read_bytes()


def test_corrupted_blob_is_data_loss_and_returns_nothing(registry: Registry, tmp_path: Path) -> None:
    record = registry.blobs.put_bytes(b"original bytes")
    registry.store.put_bytes(registry.keys.blob(record.sha256), b"tampered bytes")
    with pytest.raises(DataLoss):
        registry.blobs.read(record.sha256)
    dest = tmp_path / "out" / "out.bin"
    with pytest.raises(DataLoss):
        registry.blobs.download(record.sha256, dest)
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no partial file either


def test_missing_blob_and_bad_digest(registry: Registry) -> None:
    with pytest.raises(NotFound):
        registry.blobs.read("0" * 64)
    with pytest.raises(InvalidInput):
        registry.blobs.read("../../etc/passwd")


# --- versions ---------------------------------------------------------------------------
def test_publish_allocates_versions_and_resolves(registry: Registry, tmp_path: Path) -> None:
    v1 = publish(registry, tmp_path, seed=1, metrics={"loss": 0.5}, training_config={"rank": 4})
    v2 = publish(registry, tmp_path, seed=2, source_job_id="job-1")
    assert (v1.version, v2.version) == (1, 2)  # type: ignore[attr-defined]
    latest = registry.adapters.resolve(AdapterRef("acme", "cat"))
    assert latest.version == 2 and latest.source_job_id == "job-1"
    first = registry.adapters.resolve(AdapterRef("acme", "cat", version=1))
    assert first.metrics == {"loss": 0.5} and first.training_config == {"rank": 4}
    assert first.manifest_digest and first.manifest_digest != latest.manifest_digest
    assert registry.adapters.resolve(AdapterRef("acme", "cat", version=1)).manifest_digest == first.manifest_digest
    files = registry.adapters.fetch_files(first, tmp_path / "fetched")
    assert files[LORA_WEIGHTS_FILE].read_bytes() == (tmp_path / "lora-cat-1.safetensors").read_bytes()


def test_unknown_references_are_not_found(registry: Registry, tmp_path: Path) -> None:
    publish(registry, tmp_path)
    for call in (
        lambda: registry.adapters.resolve(AdapterRef("acme", "dog")),
        lambda: registry.adapters.resolve(AdapterRef("acme", "cat", version=9)),
        lambda: registry.adapters.resolve(AdapterRef("acme", "cat", alias="prod")),
        lambda: registry.adapters.resolve(AdapterRef("other", "cat")),
        lambda: registry.adapters.list_versions("acme", "dog"),
    ):
        with pytest.raises(AdapterNotFound):
            call()


@pytest.mark.parametrize("bad", ["../x", "a/b", "Upper", "", "x" * 200, "a..b", "-lead", "sp ace"])
def test_bad_names_are_invalid_with_the_field(registry: Registry, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        publish(registry, tmp_path, name=bad)
    assert err.value.violations[0].field == "name"
    with pytest.raises(InvalidInput) as err:
        publish(registry, tmp_path, base_model=bad)
    assert err.value.violations[0].field == "base_model"
    with pytest.raises(InvalidInput) as err:
        registry.adapters.set_alias("acme", "cat", bad, 1)
    assert err.value.violations[0].field == "alias"


@pytest.mark.parametrize("filename,content", [
    ("adapter.bin", b"\x80\x04\x95whatever"),
    ("model.pt", b"PK\x03\x04zip"),
    ("pytorch_lora_weights.safetensors", b"\x80\x02}q\x00."),
    ("pytorch_lora_weights.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "),
    ("pytorch_lora_weights.safetensors", b"\x02"),
])
def test_unsafe_or_malformed_files_are_refused_and_nothing_is_stored(
    registry: Registry, tmp_path: Path, filename: str, content: bytes
) -> None:
    bad = tmp_path / "upload"
    bad.write_bytes(content)
    with pytest.raises(InvalidInput) as err:
        registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny", files={filename: bad})
    assert err.value.violations[0].field.startswith("files")
    assert list(registry.store.list_keys("t/")) == []


def test_truncated_safetensors_refused(registry: Registry, tmp_path: Path) -> None:
    good = write_lora(tmp_path / "l.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InvalidInput, match="truncated"):
        registry.adapters.publish("acme", "cat", kind="LORA", base_model="tiny", files={LORA_WEIGHTS_FILE: cut})


# --- aliases ----------------------------------------------------------------------------
def test_alias_compare_and_swap(registry: Registry, tmp_path: Path) -> None:
    for seed in range(3):
        publish(registry, tmp_path, seed=seed)
    assert registry.adapters.set_alias("acme", "cat", "prod", 1, expected_version=0) is None
    with pytest.raises(PreconditionConflict, match="expected it not to exist"):
        registry.adapters.set_alias("acme", "cat", "prod", 2, expected_version=0)
    with pytest.raises(PreconditionConflict, match="expected version 3, but it points at version 1"):
        registry.adapters.set_alias("acme", "cat", "prod", 2, expected_version=3)
    assert registry.adapters.set_alias("acme", "cat", "prod", 2, expected_version=1) == 1
    assert registry.adapters.set_alias("acme", "cat", "prod", 3) == 2  # unconditional
    assert registry.adapters.resolve(AdapterRef("acme", "cat", alias="prod")).version == 3
    assert registry.adapters.aliases("acme", "cat") == {"prod": 3}
    with pytest.raises(AdapterNotFound):
        registry.adapters.set_alias("acme", "cat", "prod", 7)  # target must exist
    with pytest.raises(InvalidInput):
        registry.adapters.set_alias("acme", "cat", "latest", 1)
    registry.adapters.delete_alias("acme", "cat", "prod")
    with pytest.raises(NotFound):
        registry.adapters.delete_alias("acme", "cat", "prod")
    with pytest.raises(PreconditionConflict, match="does not exist"):
        registry.adapters.set_alias("acme", "cat", "prod", 2, expected_version=3)


def test_delete_version_refused_while_aliased_and_number_never_reused(registry: Registry, tmp_path: Path) -> None:
    publish(registry, tmp_path, seed=1)
    publish(registry, tmp_path, seed=2)
    registry.adapters.set_alias("acme", "cat", "prod", 2)
    with pytest.raises(FailedPrecondition, match="prod"):
        registry.adapters.delete_version("acme", "cat", 2)
    registry.adapters.set_alias("acme", "cat", "prod", 1)
    registry.adapters.delete_version("acme", "cat", 2)
    with pytest.raises(AdapterNotFound):
        registry.adapters.resolve(AdapterRef("acme", "cat", version=2))
    assert registry.adapters.resolve(AdapterRef("acme", "cat")).version == 1
    assert publish(registry, tmp_path, seed=3).version == 3  # type: ignore[attr-defined]
    with pytest.raises(AdapterNotFound):
        registry.adapters.delete_version("acme", "cat", 2)


def test_adapter_with_every_version_deleted_disappears(registry: Registry, tmp_path: Path) -> None:
    publish(registry, tmp_path, name="gone")
    publish(registry, tmp_path, name="kept")
    registry.adapters.delete_version("acme", "gone", 1)
    assert [s.name for s in registry.adapters.list_adapters("acme")[0]] == ["kept"]
    assert publish(registry, tmp_path, name="gone").version == 2  # type: ignore[attr-defined]


# --- listing ----------------------------------------------------------------------------
def test_list_adapters_pages_and_filters(registry: Registry, tmp_path: Path) -> None:
    names = ["a", "a-b", "a.c", "b", "c0", "dog"]
    for name in names:
        publish(registry, tmp_path, name=name, base_model="sdxl" if name == "b" else "tiny")
    ti = write_ti(tmp_path / "ti.safetensors")
    registry.adapters.publish("acme", "tok", kind="TEXTUAL_INVERSION", base_model="tiny",
                             files={TI_EMBEDS_FILE: ti}, trigger_tokens=["<cat-toy>"])
    registry.adapters.set_alias("acme", "dog", "prod", 1)
    seen, token, pages = [], "", 0
    while True:
        page, token = registry.adapters.list_adapters("acme", page_size=2, page_token=token)
        seen += page
        pages += 1
        if not token:
            break
    assert sorted(s.name for s in seen) == sorted([*names, "tok"]) and len(seen) == 7 and pages == 4
    dog = next(s for s in seen if s.name == "dog")
    assert dog.aliases == {"prod": 1} and dog.latest_version == 1 and dog.kind == "LORA"
    only_ti, _ = registry.adapters.list_adapters("acme", kind="TEXTUAL_INVERSION")
    assert [s.name for s in only_ti] == ["tok"]
    sdxl, _ = registry.adapters.list_adapters("acme", base_model="sdxl")
    assert [s.name for s in sdxl] == ["b"]
    assert registry.adapters.list_adapters("nobody") == ([], "")
    with pytest.raises(InvalidInput) as err:
        registry.adapters.list_adapters("acme", page_token="garbage!")
    assert err.value.violations[0].field == "page_token"
    _, versions_token = (publish(registry, tmp_path, name="a"), registry.adapters.list_versions("acme", "a", 1)[1])
    with pytest.raises(InvalidInput):
        registry.adapters.list_adapters("acme", page_token=versions_token)  # a token of another listing
    with pytest.raises(InvalidInput):
        registry.adapters.list_adapters("acme", page_size=-1)


def test_list_versions_pages(registry: Registry, tmp_path: Path) -> None:
    for seed in range(5):
        publish(registry, tmp_path, seed=seed)
    got, token = [], ""
    while True:
        page, token = registry.adapters.list_versions("acme", "cat", page_size=2, page_token=token)
        got += [m.version for m in page]
        if not token:
            break
    assert got == [1, 2, 3, 4, 5]


def test_tenants_are_isolated(registry: Registry, tmp_path: Path) -> None:
    publish(registry, tmp_path, tenant="tenant-a", name="secret")
    with pytest.raises(AdapterNotFound) as err:
        registry.adapters.resolve(AdapterRef("tenant-b", "secret"))
    assert "tenant-a" not in str(err.value)
    assert registry.adapters.list_adapters("tenant-b") == ([], "")
    with pytest.raises(AdapterNotFound):
        registry.adapters.set_alias("tenant-b", "secret", "prod", 1)
    with pytest.raises(AdapterNotFound):
        registry.adapters.delete_version("tenant-b", "secret", 1)
    assert registry.adapters.resolve(AdapterRef("tenant-a", "secret")).version == 1
