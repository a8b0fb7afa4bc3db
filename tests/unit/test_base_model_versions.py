"""Base-model versions on a local-directory registry: allocation, idempotence, tombstones, legacy read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.errors import DataLoss, InvalidInput, NotFound
from services.registry.adapter_import import import_adapter_file
from services.registry.manifests import BaseModelManifest
from services.registry.names import parse_base_ref
from services.registry.registry import Registry
from services.registry.store import open_store
from tests.fixtures.s3 import write_fake_pipeline, write_lora


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(open_store(Settings(registry_url=f"file://{tmp_path / 'registry'}")))


def pipe(tmp_path: Path, seed: int) -> Path:
    return write_fake_pipeline(tmp_path / f"pipe-{seed}", seed=seed)


@pytest.mark.parametrize("ref,parsed", [("tiny-sd", ("tiny-sd", None)), ("tiny-sd@1", ("tiny-sd", 1)),
                                        ("a.b@0012", ("a.b", 12))])
def test_parse_base_ref(ref: str, parsed: tuple[str, int | None]) -> None:
    assert parse_base_ref(ref, "f") == parsed


@pytest.mark.parametrize("bad", ["", "@1", "tiny@", "tiny@0", "tiny@-1", "tiny@x", "tiny@1@2", "tiny@²",
                                 "tiny@12345678901", "Tiny@1", "../x@1"])
def test_bad_base_refs_name_the_field(bad: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_base_ref(bad, "spec.base_model")
    assert err.value.violations[0].field == "spec.base_model"


def test_new_bytes_are_a_new_version_and_same_bytes_are_idempotent(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.base_models.import_folder("tiny", pipe(tmp_path, 0))
    assert v1.version == 1 and v1.ref == "tiny@1"
    assert registry.base_models.import_folder("tiny", pipe(tmp_path, 0)) == v1  # no new version
    v2 = registry.base_models.import_folder("tiny", pipe(tmp_path, 1))
    assert v2.version == 2 and v2.digest != v1.digest
    assert registry.base_models.import_folder("tiny", pipe(tmp_path, 0)) == v1  # still a live version
    assert registry.base_models.get("tiny") == v2
    assert registry.base_models.get("tiny@1") == v1 and registry.base_models.get("tiny@2") == v2
    assert [m.version for m in registry.base_models.versions("tiny")] == [1, 2]
    assert registry.base_models.find_digest("tiny", v1.digest) == v1
    assert registry.base_models.materialize("tiny@1", tmp_path / "m").name == v1.digest
    with pytest.raises(NotFound):
        registry.base_models.get("tiny@3")


def test_deleted_numbers_are_never_reused(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.base_models.import_folder("tiny", pipe(tmp_path, 0))
    v2 = registry.base_models.import_folder("tiny", pipe(tmp_path, 1))
    assert registry.base_models.delete("tiny@2") == [v2]
    assert registry.base_models.get("tiny") == v1  # newest *live* version
    with pytest.raises(NotFound):
        registry.base_models.get("tiny@2")
    v3 = registry.base_models.import_folder("tiny", pipe(tmp_path, 1))  # v2's bytes again: a new number
    assert v3.version == 3 and v3.digest == v2.digest
    assert [m.version for m in registry.base_models.delete("tiny")] == [1, 3]  # plain name: every version
    for ref in ("tiny", "tiny@1", "tiny@3"):
        with pytest.raises(NotFound):
            registry.base_models.get(ref)
    with pytest.raises(NotFound):
        registry.base_models.delete("tiny")
    with pytest.raises(NotFound):
        registry.base_models.delete("tiny@1")
    assert registry.base_models.import_folder("tiny", pipe(tmp_path, 0)).version == 4
    assert [m.name for m in registry.base_models.list_page()[0]] == ["tiny"]


def write_legacy(registry: Registry, manifest: BaseModelManifest) -> None:
    """What the pre-versioning release wrote: base-models/<name>/manifest.json, no version field."""
    data = manifest.model_dump_json(exclude={"version"}).encode()
    registry.store.put_bytes(registry.keys.base_model(manifest.name), data, if_none_match=True)


def test_legacy_manifest_reads_as_version_1(registry: Registry, tmp_path: Path) -> None:
    made = registry.base_models.import_folder("scratch", pipe(tmp_path, 0))
    registry.base_models.delete("scratch")
    write_legacy(registry, made.model_copy(update={"name": "old"}))
    legacy = registry.base_models.get("old")
    assert (legacy.name, legacy.version, legacy.digest) == ("old", 1, made.digest)
    assert registry.base_models.get("old@1") == legacy
    assert registry.base_models.import_folder("old", pipe(tmp_path, 0)) == legacy  # same bytes: idempotent
    assert [(m.name, m.version) for m in registry.base_models.list_page()[0]] == [("old", 1)]
    v2 = registry.base_models.import_folder("old", pipe(tmp_path, 1))
    assert v2.version == 2 and registry.base_models.get("old") == v2
    assert registry.base_models.get("old@1") == legacy
    registry.base_models.delete("old@1")
    assert not registry.store.exists(registry.keys.base_model("old"))
    with pytest.raises(NotFound):
        registry.base_models.get("old@1")
    assert registry.base_models.import_folder("old", pipe(tmp_path, 0)).version == 3


def test_listing_shows_the_newest_version_of_each_name(registry: Registry, tmp_path: Path) -> None:
    registry.base_models.import_folder("tiny", pipe(tmp_path, 0))
    registry.base_models.import_folder("tiny", pipe(tmp_path, 1))
    registry.base_models.import_folder("tiny-sd", pipe(tmp_path, 2))
    registry.base_models.import_folder("gone", pipe(tmp_path, 3))
    registry.base_models.delete("gone")
    page, token = registry.base_models.list_page(page_size=1)
    rest, end = registry.base_models.list_page(page_size=5, page_token=token)
    assert [(m.name, m.version) for m in page + rest] == [("tiny-sd", 1), ("tiny", 2)] and end == ""


def test_concurrent_imports_get_distinct_versions(registry: Registry, tmp_path: Path) -> None:
    folders = [pipe(tmp_path, seed) for seed in range(4)]
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda f: registry.base_models.import_folder("tiny", f), folders))
    assert sorted(m.version for m in made) == [1, 2, 3, 4]
    assert {m.digest for m in made} == {m.digest for m in registry.base_models.versions("tiny")}


def test_a_manifest_under_the_wrong_number_is_data_loss(registry: Registry, tmp_path: Path) -> None:
    v1 = registry.base_models.import_folder("tiny", pipe(tmp_path, 0))
    forged = v1.model_copy(update={"version": 1}).to_json_bytes()
    registry.store.put_bytes(registry.keys.base_model_version("tiny", 7), forged)
    with pytest.raises(DataLoss):
        registry.base_models.get("tiny@7")


def test_adapter_import_against_a_pinned_version_records_name_and_that_digest(registry: Registry,
                                                                               tmp_path: Path) -> None:
    v1 = registry.base_models.import_folder("tiny", pipe(tmp_path, 0))
    registry.base_models.import_folder("tiny", pipe(tmp_path, 1))
    lora = import_adapter_file(registry, "acme", name="imp", base_model="tiny@1", kind_hint=None, format_hint="",
                               filename="l.safetensors", path=write_lora(tmp_path / "l.safetensors"))
    assert (lora.base_model, lora.base_model_digest) == ("tiny", v1.digest)
    with pytest.raises(NotFound):
        import_adapter_file(registry, "acme", name="imp", base_model="tiny@5", kind_hint=None, format_hint="",
                            filename="l.safetensors", path=tmp_path / "l.safetensors")
