"""DreamBooth export: zipped diffusers folder and single-file original-layout checkpoint.

The checkpoint writer is verified by diffusers' own reader: `from_single_file(path,
config=<base folder>)` works offline on the tiny models and must give back exactly the
trained weights and the same image as the assembled diffusers folder.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition
from services.registry.interop import export_dreambooth
from services.registry.interop.api import read_metadata
from services.registry.interop.ldm_names import UnetNameMap
from services.registry.interop.shapes import BaseModelShapes
from tests.unit import test_interop_fixtures as fx
from tests.unit.test_interop_fixtures import generate, load_pipe

# Session fixtures shared by the interop tests.
_one_thread = fx._one_thread
sd1_shapes = fx.sd1_shapes
sdxl_shapes = fx.sdxl_shapes
tiny_sdxl_dir = fx.tiny_sdxl_dir


def _trained_artifact(base: Path, out: Path, components: tuple[str, ...]) -> Path:
    """What the DreamBooth trainer publishes: full component folders with changed weights."""
    for comp in components:
        shutil.copytree(base / comp, out / comp)
        weights = next((out / comp).glob("*.safetensors"))
        state = load_file(str(weights))
        g = torch.Generator().manual_seed(len(comp))
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}, str(weights))
    return out


def _from_single_file(path: Path, config: Path, sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_checkpoint_reads_back_exactly(arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    base: Path = request.getfixturevalue("tiny_random_pipeline_dir" if arch == "sd1" else "tiny_sdxl_dir")
    shapes: BaseModelShapes = request.getfixturevalue(f"{arch}_shapes")
    trained = _trained_artifact(base, tmp_path / "trained", ("unet", "text_encoder"))
    ckpt = export_dreambooth(base, trained, shapes, "checkpoint", tmp_path / "sks-dog.safetensors", "sks-dog")

    keys = load_file(str(ckpt))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    te_prefix = "conditioner.embedders.0.transformer.text_model." if arch == "sdxl" else (
        "cond_stage_model.transformer.text_model.")
    assert any(k.startswith(te_prefix) for k in keys)
    if arch == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert read_metadata(ckpt)["modelspec.title"] == "sks-dog"

    reread = _from_single_file(ckpt, base, arch == "sdxl")
    expected = load_pipe(base)
    for comp in ("unet", "text_encoder"):
        getattr(expected, comp).load_state_dict(load_file(str(next((trained / comp).glob("*.safetensors")))))
    for comp in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if arch == "sdxl" else ())):
        want, got = getattr(expected, comp).state_dict(), getattr(reread, comp).state_dict()
        assert want.keys() == got.keys(), comp
        assert all(torch.equal(want[k], got[k]) for k in want), comp
    assert np.array_equal(generate(reread), generate(expected))


def test_diffusers_zip_is_a_loadable_pipeline(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    trained = _trained_artifact(tiny_random_pipeline_dir, tmp_path / "trained", ("unet",))
    archive = export_dreambooth(tiny_random_pipeline_dir, trained, sd1_shapes, "diffusers", tmp_path / "db.zip", "db")
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        assert "model_index.json" in names and "unet/diffusion_pytorch_model.safetensors" in names
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        zf.extractall(tmp_path / "unzipped")
    pipe = load_pipe(tmp_path / "unzipped")
    trained_unet = load_file(str(trained / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in trained_unet.items())
    assert not (tmp_path / "db-pipeline").exists(), "the scratch folder is removed"


def test_dreambooth_format_and_artifact_errors(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match="no trained unet/ or text_encoder/"):
        export_dreambooth(tiny_random_pipeline_dir, empty, sd1_shapes, "checkpoint", tmp_path / "x.safetensors", "x")
    with pytest.raises(FailedPrecondition, match="cannot be exported as 'kohya'") as err:
        export_dreambooth(tiny_random_pipeline_dir, empty, sd1_shapes, "kohya", tmp_path / "x.safetensors", "x")
    assert err.value.field_name == "format"


# Anchors from real SDXL checkpoints (sgm names) for the SDXL base UNet config.
SDXL_CONFIG = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
}
SDXL_ANCHORS = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k": "input_blocks.8.1.transformer_blocks.9.attn2.to_k",
    "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
    "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
    "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.norm1": "output_blocks.8.0.in_layers.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "conv_out": "out.2",
}


def test_unet_name_map_matches_sdxl_checkpoints_and_inverts() -> None:
    names = UnetNameMap(SDXL_CONFIG)
    for diffusers, ldm in SDXL_ANCHORS.items():
        assert names.to_ldm(diffusers) == ldm
        assert names.to_diffusers(ldm) == diffusers
    assert names.to_diffusers("input_blocks.99.1.proj_in") is None
