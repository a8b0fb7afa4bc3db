"""Registry contract for datasets, base models, checkpoints and adapter import (local + S3)."""

from __future__ import annotations

import io
import json
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.errors import DataLoss, InvalidInput, NotFound
from services.registry.adapter_import import import_adapter_file
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from services.registry.registry import Registry
from services.registry.safety import ensure_safetensors
from services.registry.store import open_store
from tests.fixtures.s3 import write_fake_pipeline, write_lora, write_safetensors, write_ti


@pytest.fixture
def registry(registry_settings: Settings) -> Registry:
    return Registry(open_store(registry_settings))


# --- datasets ---------------------------------------------------------------------------
def test_dataset_roundtrip_and_listing(registry: Registry, tmp_path: Path) -> None:
    images = [(f"img{i}.PNG", f"a photo {i}", f"bytes-{i}".encode() * 10, 64, 64 + i) for i in range(3)]
    made = registry.datasets.put("acme", "cats", images)
    got = registry.datasets.get("acme", made.id)
    assert got == made and got.total_bytes == sum(len(i[2]) for i in images)
    assert [(r.index, r.caption, r.height) for r in got.images] == [(0, "a photo 0", 64), (1, "a photo 1", 65),
                                                                    (2, "a photo 2", 66)]
    paths = registry.datasets.fetch_images(got, tmp_path / "imgs")
    assert [p.name for p in paths] == ["0000.png", "0001.png", "0002.png"]
    assert [p.read_bytes() for p in paths] == [i[2] for i in images]
    second = registry.datasets.put("acme", "dogs", images[:1])
    page, token = registry.datasets.list_page("acme", page_size=1)
    rest, end = registry.datasets.list_page("acme", page_size=1, page_token=token)
    assert {page[0].id, rest[0].id} == {made.id, second.id} and end == ""
    with pytest.raises(NotFound):
        registry.datasets.get("other", made.id)
    with pytest.raises(InvalidInput) as err:
        registry.datasets.put("acme", "empty", [])
    assert err.value.violations[0].field == "images"


def test_dataset_image_corruption_is_data_loss(registry: Registry, tmp_path: Path) -> None:
    made = registry.datasets.put("acme", "cats", [("a.png", "", b"real image bytes", 64, 64)])
    registry.store.put_bytes(registry.keys.blob(made.images[0].sha256), b"evil")
    with pytest.raises(DataLoss):
        registry.datasets.fetch_images(made, tmp_path / "imgs")


# --- base models ------------------------------------------------------------------------
def test_base_model_import_get_list_materialize_delete(registry: Registry, tmp_path: Path) -> None:
    folder = write_fake_pipeline(tmp_path / "pipe")
    manifest = registry.base_models.import_folder("tiny", folder, description="test")
    assert manifest.architecture == "stable-diffusion" and len(manifest.files) == 9
    assert {f.path for f in manifest.files} >= {"model_index.json", "unet/diffusion_pytorch_model.safetensors"}
    assert registry.base_models.get("tiny") == manifest and manifest.version == 1
    assert registry.base_models.import_folder("tiny", folder) == manifest  # same bytes: that version again
    registry.base_models.import_folder("other", write_fake_pipeline(tmp_path / "pipe2", seed=1))
    page, token = registry.base_models.list_page(page_size=1)
    rest, end = registry.base_models.list_page(page_size=1, page_token=token)
    assert [m.name for m in page + rest] == ["other", "tiny"] and end == ""

    root = tmp_path / "models"
    with ThreadPoolExecutor(4) as pool:  # concurrent callers share one materialisation
        dirs = list(pool.map(lambda _: registry.base_models.materialize("tiny", root), range(4)))
    assert len(set(dirs)) == 1 and dirs[0] == root / manifest.digest
    for f in manifest.files:
        assert (dirs[0] / f.path).read_bytes() == (folder / f.path).read_bytes()
    assert [p.name for p in root.iterdir()] == [manifest.digest]  # no temp dirs left
    registry.base_models.delete("tiny")
    with pytest.raises(NotFound):
        registry.base_models.get("tiny")
    with pytest.raises(NotFound):
        registry.base_models.delete("tiny")


@pytest.mark.parametrize("bad_file", ["unet/diffusion_pytorch_model.bin", "vae/model.ckpt", "x.pkl", "notes.exe"])
def test_base_model_refuses_pickles_and_unknown_files(registry: Registry, tmp_path: Path, bad_file: str) -> None:
    folder = write_fake_pipeline(tmp_path / "pipe")
    (folder / bad_file).write_bytes(b"\x80\x04data")
    with pytest.raises(InvalidInput) as err:
        registry.base_models.import_folder("tiny", folder)
    assert bad_file in str(err.value)
    with pytest.raises(NotFound):
        registry.base_models.get("tiny")


def test_base_model_needs_model_index(registry: Registry, tmp_path: Path) -> None:
    folder = write_fake_pipeline(tmp_path / "pipe")
    (folder / "model_index.json").unlink()
    with pytest.raises(InvalidInput, match=r"model_index\.json"):
        registry.base_models.import_folder("tiny", folder)


def test_materialized_tiny_pipeline_loads_in_diffusers(tmp_path: Path) -> None:
    """The round trip that matters: import a real pipeline, materialise it, from_pretrained it."""
    pipeline = pytest.importorskip("services.tinymodel.pipeline")
    from diffusers import StableDiffusionPipeline

    folder = pipeline.build_random_pipeline(tmp_path / "tiny")
    registry = Registry(open_store(Settings(registry_url=f"file://{tmp_path / 'reg'}")))
    registry.base_models.import_folder("tiny-sd", folder)
    local = registry.base_models.materialize("tiny-sd", tmp_path / "cache")
    pipe = StableDiffusionPipeline.from_pretrained(str(local), safety_checker=None)
    assert pipe.unet is not None and pipe.tokenizer is not None


# --- checkpoints ------------------------------------------------------------------------
def test_checkpoints_latest_fetch_delete(registry: Registry, tmp_path: Path) -> None:
    assert registry.checkpoints.latest("acme", "job-1") is None
    state = tmp_path / "state.json"
    for step in (10, 20, 5):
        state.write_text(json.dumps({"step": step}))
        weights = write_lora(tmp_path / f"w{step}.safetensors", seed=step)
        registry.checkpoints.put("acme", "job-1", step, {"lora.safetensors": weights, "state.json": state})
    latest = registry.checkpoints.latest("acme", "job-1")
    assert latest is not None and latest.step == 20
    files = registry.checkpoints.fetch(latest, tmp_path / "resume")
    assert json.loads(files["state.json"].read_text()) == {"step": 20}
    assert registry.checkpoints.latest("acme", "job-2") is None
    assert registry.checkpoints.latest("other", "job-1") is None
    with pytest.raises(InvalidInput):
        registry.checkpoints.put("acme", "job-1", 30, {"optimizer.pt": state})
    registry.checkpoints.delete_all("acme", "job-1")
    assert registry.checkpoints.latest("acme", "job-1") is None


# --- adapter import ---------------------------------------------------------------------
@pytest.fixture
def with_base(registry: Registry, tmp_path: Path) -> Registry:
    registry.base_models.import_folder("tiny", write_fake_pipeline(tmp_path / "pipe"))
    return registry


def _import(registry: Registry, path: Path, **kw: object) -> object:
    args: dict[str, object] = {"name": "imp", "base_model": "tiny", "kind_hint": None, "format_hint": "",
                               "filename": path.name, "path": path}
    args.update(kw)
    return import_adapter_file(registry, "acme", **args)  # type: ignore[arg-type]


def test_import_diffusers_lora_and_ti(with_base: Registry, tmp_path: Path) -> None:
    lora = _import(with_base, write_lora(tmp_path / "my_lora.safetensors"))
    assert lora.kind == "LORA" and lora.files[0].path == LORA_WEIGHTS_FILE  # type: ignore[attr-defined]
    assert lora.base_model_digest == with_base.base_models.get("tiny").digest  # type: ignore[attr-defined]
    assert lora.source_format == "diffusers"  # type: ignore[attr-defined]
    ti = _import(with_base, write_ti(tmp_path / "emb.safetensors", token="<old>"), name="tok",
                 trigger_token="<cat-toy>", kind_hint="TEXTUAL_INVERSION")
    assert ti.kind == "TEXTUAL_INVERSION" and ti.trigger_tokens == ["<cat-toy>"]  # type: ignore[attr-defined]
    files = with_base.adapters.fetch_files(ti, tmp_path / "ti")  # type: ignore[arg-type]
    assert list(ensure_safetensors(files[TI_EMBEDS_FILE], "f")) == ["<cat-toy>"]  # renamed to the trigger


def _torch_save_like(path: Path) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    path.write_bytes(buf.getvalue())
    return path


@pytest.mark.parametrize("make", [
    lambda p: _torch_save_like(p / "lora.bin"),
    lambda p: _torch_save_like(p / "lora.safetensors"),  # a pickle in disguise
    lambda p: (p / "x.pt").write_bytes(b"\x80\x04K\x01.") and p / "x.pt",
])
def test_import_refuses_pickles(with_base: Registry, tmp_path: Path, make: object) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(InvalidInput) as err:
        _import(with_base, path)
    assert "pickle" in str(err.value) or "zip" in str(err.value)


def test_import_errors(with_base: Registry, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "l.safetensors")
    with pytest.raises(NotFound):
        _import(with_base, lora, base_model="unknown-model")
    assert _import(with_base, lora, base_model="local-only", local_base_models={"local-only"})
    with pytest.raises(InvalidInput) as err:
        _import(with_base, lora, kind_hint="TEXTUAL_INVERSION")
    assert err.value.violations[0].field == "kind"
    odd = write_safetensors(tmp_path / "odd.safetensors", {"random.weight": ([2, 2, 2], b"\0" * 32)})
    with pytest.raises(InvalidInput, match="unrecognised"):
        _import(with_base, odd)
    with pytest.raises(InvalidInput) as err:
        _import(with_base, lora, format_hint="nonsense")
    assert err.value.violations[0].field == "format"
    with pytest.raises(InvalidInput) as err:
        _import(with_base, lora, name="../up")
    assert err.value.violations[0].field == "name"
