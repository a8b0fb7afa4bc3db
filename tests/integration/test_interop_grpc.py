"""Interop through the public surface: RegistryService over real gRPC and the `atelier` CLI,
with the registry on a local directory and on a real (moto) S3 server."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from atelier.cli.adapters_io import import_messages, register
from atelier.cli.context import root_callback
from atelier_api.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from services.common.config import Settings
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.registry.store import open_store
from tests.fixtures.grpc_servers import ServerThread, loopback_settings
from tests.fixtures.s3 import write_fake_pipeline
from tests.unit.test_interop_fixtures import generate, load_pipe, write_kohya

BASE = "tiny-sd"


@pytest.fixture
def server(registry_settings: Settings, tiny_random_pipeline_dir: Path, tmp_path: Path,
           grpc_server: Callable[..., ServerThread]) -> tuple[ServerThread, Registry]:
    registry = Registry(open_store(registry_settings))
    registry.base_models.import_folder(BASE, tiny_random_pipeline_dir)
    running = grpc_server(loopback_settings(), lambda: registry_bindings(registry, work_dir=tmp_path / "work"))
    return running, registry


def _cli(server: ServerThread, *args: str) -> tuple[int, str]:
    app = typer.Typer()
    app.callback()(root_callback)
    adapters = typer.Typer()
    register(adapters)
    app.add_typer(adapters, name="adapters")
    result = CliRunner().invoke(app, ["--target", server.target, *args])
    return result.exit_code, result.output


def _stub(server: ServerThread) -> registry_pb2_grpc.RegistryServiceStub:
    return registry_pb2_grpc.RegistryServiceStub(server.channel())


def _import(server: ServerThread, path: Path, name: str, **header: object) -> common_pb2.AdapterVersion:
    fields: dict[str, object] = {"name": name, "base_model": BASE, "filename": path.name}
    fields.update(header)
    h = registry_pb2.ImportAdapterHeader(**fields)  # type: ignore[arg-type]
    return _stub(server).ImportAdapter(import_messages(path, h)).version


def _stored_image(registry: Registry, base: Path, name: str, version: int, dest: Path) -> np.ndarray:
    """Generate with the stored file exactly as the registry hands it out."""
    manifest = registry.adapters.resolve(AdapterRef(loopback_settings().default_tenant, name, version))
    files = registry.adapters.fetch_files(manifest, dest)
    pipe = load_pipe(base)
    pipe.load_lora_weights(str(files["pytorch_lora_weights.safetensors"]))
    return generate(pipe)


def test_kohya_import_and_export_round_trip(server: tuple[ServerThread, Registry], tiny_random_pipeline_dir: Path,
                                            tmp_path: Path) -> None:
    running, registry = server
    kohya = tmp_path / "civitai style.safetensors"
    write_kohya(load_pipe(tiny_random_pipeline_dir), kohya, sdxl=False, rank=4, alpha=1.0)
    code, out = _cli(running, "adapters", "import", str(kohya), "--name", "style", "--base", BASE)
    assert code == 0 and "imported style@1 from kohya" in out, out

    got = _stub(running).GetAdapter(registry_pb2.GetAdapterRequest(ref=common_pb2.AdapterRef(name="style"))).version
    assert got.source_format == "kohya" and got.kind == common_pb2.ADAPTER_KIND_LORA
    assert {f.path for f in got.files} == {"pytorch_lora_weights.safetensors", "original/civitai_style.safetensors"}
    assert got.training_config["import"]["rank"] == 4

    reference = load_pipe(tiny_random_pipeline_dir)
    reference.load_lora_weights(str(kohya))  # plain diffusers reading the user's file
    first = _stored_image(registry, tiny_random_pipeline_dir, "style", 1, tmp_path / "v1")
    assert np.array_equal(first, generate(reference))

    code, out = _cli(running, "adapters", "export", "style@1", "--format", "kohya", "-o", str(tmp_path))
    assert code == 0, out
    exported = tmp_path / "style.safetensors"
    with safe_open(str(exported), framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys())  # noqa: SIM118
    again = _import(running, exported, "style")
    assert (again.version, again.source_format) == (2, "kohya")
    assert np.array_equal(_stored_image(registry, tiny_random_pipeline_dir, "style", 2, tmp_path / "v2"), first)


def test_a1111_embedding_import_and_export(server: tuple[ServerThread, Registry], tmp_path: Path) -> None:
    running, _ = server
    vectors = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "toy.safetensors"
    save_file({"emb_params": vectors}, str(src))
    code, out = _cli(running, "adapters", "import", str(src), "--name", "toy", "--base", BASE, "--kind", "ti",
                     "--token", "<cat-toy>")
    assert code == 0 and "token <cat-toy>" in out and "from a1111" in out, out
    out_file = tmp_path / "exported.safetensors"
    code, out = _cli(running, "adapters", "export", "toy", "--format", "a1111", "-o", str(out_file))
    assert code == 0, out
    assert torch.equal(load_file(str(out_file))["emb_params"], vectors)


def _status(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def test_refusals_over_grpc_and_cli(server: tuple[ServerThread, Registry], tmp_path: Path) -> None:
    running, _ = server
    pt = tmp_path / "embedding.pt"
    pt.write_bytes(pickle.dumps({"string_to_param": {"*": [0.0]}}, protocol=2))
    err = _status(lambda: _import(running, pt, "bad"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "never unpickles" in err.details()

    lokr = tmp_path / "lokr.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lokr_w1": torch.zeros(2, 2), f"{name}.lokr_w2": torch.zeros(2, 2)}, str(lokr))
    err = _status(lambda: _import(running, lokr, "bad"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "LoKr" in err.details()

    wide = tmp_path / "sd15_lora.safetensors"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{te}.lora_down.weight": torch.zeros(4, 768), f"{te}.lora_up.weight": torch.zeros(768, 4)}, str(wide))
    err = _status(lambda: _import(running, wide, "bad"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details().startswith(f"{te}.lora_down.weight: LoRA input width 768")

    code, out = _cli(running, "adapters", "import", str(wide), "--name", "bad", "--base", BASE)
    assert code == 2 and "FAILED_PRECONDITION" in out
    err = _status(lambda: _import(running, lokr, "bad", base_model="no-such-model"))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_dreambooth_checkpoint_export(server: tuple[ServerThread, Registry], tiny_random_pipeline_dir: Path,
                                      tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    running, registry = server
    unet_dir = tmp_path / "trained" / "unet"
    unet_dir.mkdir(parents=True)
    (unet_dir / "config.json").write_bytes((tiny_random_pipeline_dir / "unet" / "config.json").read_bytes())
    state = load_file(str(tiny_random_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = {k: v + 0.01 for k, v in state.items()}
    save_file(trained, str(unet_dir / "diffusion_pytorch_model.safetensors"))
    registry.adapters.publish(running.settings.default_tenant, "sks-dog", kind="DREAMBOOTH", base_model=BASE,
                             files={f"unet/{p.name}": p for p in unet_dir.iterdir()})

    out_file = tmp_path / "sks-dog.safetensors"
    code, out = _cli(running, "adapters", "export", "sks-dog", "--format", "checkpoint", "-o", str(out_file))
    assert code == 0, out
    pipe = StableDiffusionPipeline.from_single_file(str(out_file), config=str(tiny_random_pipeline_dir),
                                                    local_files_only=True)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in trained.items())


def test_base_model_without_configs(server: tuple[ServerThread, Registry], tiny_random_pipeline_dir: Path,
                                    tmp_path: Path) -> None:
    """A base whose configs are not a diffusers UNet: our own layout is stored as is, kohya cannot be named."""
    running, registry = server
    registry.base_models.import_folder("fake", write_fake_pipeline(tmp_path / "fake"))
    kohya = tmp_path / "k.safetensors"
    write_kohya(load_pipe(tiny_random_pipeline_dir), kohya, sdxl=False)
    err = _status(lambda: _import(running, kohya, "k", base_model="fake"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "import the base model" in err.details()

    peft = tmp_path / "p.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({f"{key}.lora_A.weight": torch.ones(2, 8), f"{key}.lora_B.weight": torch.ones(8, 2)}, str(peft))
    assert _import(running, peft, "p", base_model="fake").source_format == "diffusers"
    request = registry_pb2.ExportAdapterRequest(ref=common_pb2.AdapterRef(name="p"),
                                                format=registry_pb2.ADAPTER_FORMAT_KOHYA)
    err = _status(lambda: list(_stub(running).ExportAdapter(request)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "import the base model first" in err.details()
