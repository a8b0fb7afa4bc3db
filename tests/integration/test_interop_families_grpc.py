"""Interop per model family through RegistryService over real gRPC (registry on a local directory).

For SDXL and Flux: ImportAdapter of a kohya file (derived by hand from a diffusers-made LoRA),
the version records the base model's family, the stored LoRA generates what plain diffusers
makes of the user's file, ExportAdapter to kohya streams a file plain diffusers reads to the
same image, and importing that export again stores the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from atelier.cli.adapters_io import import_messages
from atelier_api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.config import Settings
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.registry.store import open_store
from tests.fixtures.grpc_servers import ServerThread, loopback_settings
from tests.unit import interop_families_support as fam

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def server(tiny_family_dirs: dict[str, Path], tmp_path: Path,
           grpc_server: Callable[..., ServerThread]) -> tuple[ServerThread, Registry]:
    settings = Settings(registry_url=f"file://{tmp_path / 'registry'}", data_dir=tmp_path / "var")
    registry = Registry(open_store(settings))
    for family in ("sdxl", "flux"):
        registry.base_models.import_folder(f"tiny-{family}", tiny_family_dirs[family])
    running = grpc_server(loopback_settings(), lambda: registry_bindings(registry, work_dir=tmp_path / "work"))
    return running, registry


def _stub(server: ServerThread) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(server.channel())


def _import(server: ServerThread, path: Path, name: str, base: str) -> common_pb2.AdapterVersion:
    header = registry_pb2.ImportAdapterHeader(name=name, base_model=base, filename=path.name)
    return _stub(server).ImportAdapter(import_messages(path, header)).version


def _export(server: ServerThread, name: str, version: int, dest: Path) -> Path:
    request = registry_pb2.ExportAdapterRequest(ref=common_pb2.AdapterRef(name=name, version=version),
                                                format=registry_pb2.ADAPTER_FORMAT_KOHYA)
    chunks = list(_stub(server).ExportAdapter(request))
    assert chunks[0].WhichOneof("payload") == "header"
    dest.write_bytes(b"".join(c.chunk for c in chunks[1:]))
    assert dest.stat().st_size == chunks[0].header.size
    return dest


def _stored(registry: Registry, name: str, version: int, dest: Path) -> Path:
    manifest = registry.adapters.resolve(AdapterRef(loopback_settings().default_tenant, name, version))
    return registry.adapters.fetch_files(manifest, dest)["pytorch_lora_weights.safetensors"]


def _image(base: Path, lora: Path) -> np.ndarray:
    pipe = fam.load_pipe(base)
    pipe.load_lora_weights(str(lora))
    return fam.generate(pipe)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_kohya_import_export_round_trip(family: str, server: tuple[ServerThread, Registry],
                                        tiny_family_dirs: dict[str, Path], tmp_path: Path) -> None:
    running, registry = server
    base, base_name = tiny_family_dirs[family], f"tiny-{family}"
    sd = load_file(str(fam.write_diffusers_lora(family, base, tmp_path)))
    kohya = tmp_path / f"{family}_style.safetensors"
    save_file(fam.sdxl_to_kohya(sd) if family == "sdxl" else fam.flux_to_kohya(sd, 1, 2), str(kohya))

    got = _import(running, kohya, "style", base_name)
    assert (got.version, got.source_format, got.base_family) == (1, "kohya", family)
    listed = _stub(running).GetBaseModel(registry_pb2.GetBaseModelRequest(name=base_name))
    assert listed.base_model.family == family
    manifest = registry.adapters.resolve(AdapterRef(loopback_settings().default_tenant, "style", 1))
    assert manifest.base_family == family

    reference = _image(base, kohya)  # plain diffusers reading the user's file
    first = _stored(registry, "style", 1, tmp_path / "v1")
    assert np.array_equal(_image(base, first), reference)

    exported = _export(running, "style", 1, tmp_path / "exported.safetensors")
    assert all(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_")) for k in load_file(str(exported)))
    assert np.array_equal(_image(base, exported), reference)
    again = _import(running, exported, "style", base_name)
    assert (again.version, again.source_format) == (2, "kohya")
    second = load_file(str(_stored(registry, "style", 2, tmp_path / "v2")))
    assert fam.peft_equal(second, load_file(str(first)))


def test_adapter_of_another_family_is_failed_precondition(server: tuple[ServerThread, Registry],
                                                          tiny_family_dirs: dict[str, Path], tmp_path: Path) -> None:
    running, _ = server
    sd = load_file(str(fam.write_diffusers_lora("sdxl", tiny_family_dirs["sdxl"], tmp_path)))
    kohya = tmp_path / "sdxl.safetensors"
    save_file(fam.sdxl_to_kohya(sd), str(kohya))
    with pytest.raises(grpc.RpcError) as err:
        _import(running, kohya, "wrong", "tiny-flux")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = err.value.details() or ""  # the first key in sorted order: SDXL's second text encoder
    assert details.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight: ")
    assert "LoRA on text_encoder_2 is not supported for Flux" in details


def test_export_of_an_adapter_recorded_for_another_family_names_both(
        server: tuple[ServerThread, Registry], tiny_family_dirs: dict[str, Path], tmp_path: Path) -> None:
    running, registry = server
    lora = fam.write_diffusers_lora("sdxl", tiny_family_dirs["sdxl"], tmp_path)
    registry.adapters.publish(loopback_settings().default_tenant, "misfiled", kind="LORA", base_model="tiny-flux",
                              base_family="sdxl", files={"pytorch_lora_weights.safetensors": lora})
    with pytest.raises(grpc.RpcError) as err:
        _export(running, "misfiled", 1, tmp_path / "out.safetensors")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Stable Diffusion XL (sdxl)" in (err.value.details() or "")
    assert "Flux (flux)" in (err.value.details() or "")
