"""The inference pipeline pool's base-model resolution: pinned versions, plain-name TTL, store outages."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from services.common.config import Settings
from services.common.errors import Unavailable
from services.inference.pipelines import PipelinePool
from services.registry.registry import Registry
from services.registry.store import ObjectStore, StoreUnavailable, open_store


class SwitchableStore:
    """The real local store, which can be switched off (every call raises StoreUnavailable)."""

    def __init__(self, inner: ObjectStore) -> None:
        self._inner = inner
        self.down = False

    def __getattr__(self, name: str) -> Any:
        if self.down:
            raise StoreUnavailable("switched off for the test")
        return getattr(self._inner, name)


def pool_over(tmp_path: Path, pipeline_dir: Path, ttl: float) -> tuple[PipelinePool, Registry, SwitchableStore]:
    settings = Settings(registry_url=f"file://{tmp_path / 'registry'}", cache_dir=tmp_path / "cache",
                        adapter_ref_ttl_seconds=ttl, base_model_paths="")
    store = SwitchableStore(open_store(settings))
    registry = Registry(store)  # type: ignore[arg-type]
    registry.base_models.import_folder("tiny-sd", pipeline_dir)
    return PipelinePool(settings, registry), registry, store


def test_plain_name_follows_new_versions_and_survives_an_outage(tmp_path: Path,
                                                                tiny_random_pipeline_dir: Path) -> None:
    pool, registry, store = pool_over(tmp_path, tiny_random_pipeline_dir, ttl=0.0)
    v1 = pool.get("tiny-sd")
    assert (v1.name, v1.model_name) == ("tiny-sd@1", "tiny-sd")
    assert pool.peek("tiny-sd") is None  # TTL 0: a plain name always asks the registry
    assert pool.peek("tiny-sd@1") is v1 and pool.get("tiny-sd@1") is v1
    changed = Path(shutil.copytree(tiny_random_pipeline_dir, tmp_path / "changed"))
    (changed / "NOTES.md").write_text("v2")  # one more file: new bytes, same loadable pipeline
    registry.base_models.import_folder("tiny-sd", changed)
    v2 = pool.get("tiny-sd")
    assert v2.name == "tiny-sd@2" and v2.digest != v1.digest and v2.pipe is not v1.pipe
    assert pool.loaded() == ["tiny-sd@1", "tiny-sd@2"]
    store.down = True
    assert pool.get("tiny-sd") is v2  # the last resolution, stale but consistent
    assert pool.get("tiny-sd@1") is v1  # pinned: no I/O at all
    with pytest.raises(Unavailable):
        pool.get("never-seen")


def test_within_the_ttl_a_plain_name_needs_no_io(tmp_path: Path, tiny_random_pipeline_dir: Path) -> None:
    pool, _, store = pool_over(tmp_path, tiny_random_pipeline_dir, ttl=3600.0)
    model = pool.get("tiny-sd")
    store.down = True
    assert pool.peek("tiny-sd") is model
