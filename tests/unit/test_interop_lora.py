"""LoRA import/export: images must equal plain diffusers loading of the foreign file, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.registry.interop import export_lora, import_file
from services.registry.interop.api import read_metadata
from services.registry.interop.shapes import BaseModelShapes
from services.registry.manifests import LORA_WEIGHTS_FILE
from tests.unit import test_interop_fixtures as fx
from tests.unit.test_interop_fixtures import generate, load_pipe, write_kohya

# Session fixtures shared by the interop tests.
_one_thread = fx._one_thread
sd1_shapes = fx.sd1_shapes
sdxl_shapes = fx.sdxl_shapes
tiny_sdxl_dir = fx.tiny_sdxl_dir


def _image_with(base: Path, lora: Path) -> np.ndarray:
    pipe = load_pipe(base)
    pipe.load_lora_weights(str(lora))
    return generate(pipe)


def _import(src: Path, shapes: BaseModelShapes, tmp: Path, **hints: str) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    result = import_file(src, src.name, shapes, work, **hints)
    assert result.kind == "LORA"
    return result.files[LORA_WEIGHTS_FILE]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_kohya_import_matches_diffusers_bit_exact(arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    base: Path = request.getfixturevalue("tiny_random_pipeline_dir" if arch == "sd1" else "tiny_sdxl_dir")
    shapes: BaseModelShapes = request.getfixturevalue(f"{arch}_shapes")
    kohya = tmp_path / "civitai_lora.safetensors"
    write_kohya(load_pipe(base), kohya, sdxl=arch == "sdxl", rank=4, alpha=1.0)  # scale 1/4 matters

    work = tmp_path / "work"
    work.mkdir()
    result = import_file(kohya, kohya.name, shapes, work)
    assert (result.kind, result.source_format) == ("LORA", "kohya")
    assert result.variant == ("sgm" if arch == "sdxl" else "diffusers-names")
    assert set(result.files) == {LORA_WEIGHTS_FILE, "original/civitai_lora.safetensors"}
    assert result.details["rank"] == 4 and result.details["source_alpha"] == 1.0

    plain = generate(load_pipe(base))
    reference = _image_with(base, kohya)  # diffusers' own kohya conversion
    ours = _image_with(base, result.files[LORA_WEIGHTS_FILE])
    assert np.abs(reference - plain).max() > 1e-3, "the LoRA must visibly change the image"
    assert np.array_equal(ours, reference)
    stored = load_file(str(result.files[LORA_WEIGHTS_FILE]))
    downs = [t for k, t in stored.items() if k.endswith("lora_A.weight")]
    assert all(t.dtype == torch.float16 for t in downs), "lora_A is never re-cast"
    # lora_B carries the folded 1/4 scale: float16 where that is lossless, else float32.
    assert {t.dtype for k, t in stored.items() if k.endswith("lora_B.weight")} <= {torch.float16, torch.float32}


def test_mixed_alphas_and_ranks_follow_kohya_semantics(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    """Per-module alpha/rank: scale = alpha/rank, alpha 0 or missing = rank (kohya, A1111, ComfyUI).

    diffusers 0.42's kohya loader only honours the most common alpha for attention modules
    (its alpha_pattern keys do not match module names), so this checks every loaded module's
    effective up-weight (lora_B * scaling) against the file instead of diffusers' image.
    """
    special = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 8.0,
        "lora_unet_mid_block_attentions_0_proj_in": 0.0,
        "lora_te_text_model_encoder_layers_1_mlp_fc2": 0.5,
    }
    ranks = {"lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2": 2}
    kohya = tmp_path / "mixed.safetensors"
    sd = write_kohya(load_pipe(tiny_random_pipeline_dir), kohya, sdxl=False, alpha=2.0, alphas=special, ranks=ranks)
    del sd["lora_unet_up_blocks_0_attentions_0_proj_out.alpha"]
    save_file(sd, str(kohya))

    pipe = load_pipe(tiny_random_pipeline_dir)
    pipe.load_lora_weights(str(_import(kohya, sd1_shapes, tmp_path)))
    loaded = {**_effective_up(pipe.unet, "lora_unet_"), **_effective_up(pipe.text_encoder, "lora_te_text_model_")}
    assert len(loaded) == len({k.split(".")[0] for k in sd})
    scales = {}
    for name, up in loaded.items():
        rank = sd[f"{name}.lora_down.weight"].shape[0]
        alpha = float(sd[f"{name}.alpha"].item()) if f"{name}.alpha" in sd else 0.0
        scales[name] = (alpha or rank) / rank
        assert torch.equal(up, sd[f"{name}.lora_up.weight"].float() * scales[name]), name
    assert scales["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == 2.0
    assert scales["lora_unet_mid_block_attentions_0_proj_in"] == 1.0
    assert scales["lora_unet_up_blocks_0_attentions_0_proj_out"] == 1.0
    assert scales["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2"] == 1.0
    assert scales["lora_te_text_model_encoder_layers_1_mlp_fc2"] == 0.125


def _effective_up(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = next(iter(module.scaling))
            up = module.lora_B[adapter].weight.detach() * module.scaling[adapter]
            out[prefix + name.removeprefix("text_model.").replace(".", "_")] = up
    return out


def test_non_power_of_two_scale_matches_to_float_rounding(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    """alpha 3 / rank 4: folding 0.75 into lora_B rounds differently from PEFT's (B(Ax))*0.75."""
    kohya = tmp_path / "odd.safetensors"
    write_kohya(load_pipe(tiny_random_pipeline_dir), kohya, sdxl=False, rank=4, alpha=3.0, dtype=torch.float32)
    reference = _image_with(tiny_random_pipeline_dir, kohya)
    ours = _image_with(tiny_random_pipeline_dir, _import(kohya, sd1_shapes, tmp_path))
    assert np.abs(ours - reference).max() < 1e-5


def _peft_lora_file(base: Path, dest: Path, *, alpha: int = 2, rank: int = 4) -> Path:
    """A LoRA written by diffusers itself (PEFT keys + lora_adapter_metadata), alpha != rank."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = load_pipe(base)
    unet_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "out_proj"])
    inject_adapter_in_model(unet_cfg, pipe.unet)
    inject_adapter_in_model(te_cfg, pipe.text_encoder)  # transformers' add_adapter wants peft >= 0.22
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    StableDiffusionPipeline.save_lora_weights(
        dest.parent, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), weight_name=dest.name,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    return dest


def test_diffusers_peft_import_matches_original(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    src = _peft_lora_file(tiny_random_pipeline_dir, tmp_path / "peft_lora.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    result = import_file(src, src.name, sd1_shapes, work)
    assert (result.source_format, result.variant) == ("diffusers", "peft")
    assert result.details["source_alpha"] == 2.0
    reference = _image_with(tiny_random_pipeline_dir, src)
    assert np.array_equal(_image_with(tiny_random_pipeline_dir, result.files[LORA_WEIGHTS_FILE]), reference)


def test_diffusers_old_layout_import_matches_original(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    """Pre-PEFT spellings: `lora.down`, attention processors, `lora_linear_layer`, `text_model.` paths."""
    pipe = load_pipe(tiny_random_pipeline_dir)
    g = torch.Generator().manual_seed(5)
    unet_mods = dict(pipe.unet.named_modules())
    te_mods = dict(pipe.text_encoder.named_modules())
    sd: dict[str, torch.Tensor] = {}
    for block in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.1"):
        for proj, path in (("to_q", "to_q"), ("to_out", "to_out.0")):
            key = f"unet.{block}.transformer_blocks.0.attn1.processor.{proj}_lora"
            d, u = _pair(unet_mods[f"{block}.transformer_blocks.0.attn1.{path}"].weight, g)
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = d, u
        d, u = _pair(unet_mods[f"{block}.transformer_blocks.0.ff.net.2"].weight, g)
        sd[f"unet.{block}.transformer_blocks.0.ff.net.2.lora.down.weight"] = d
        sd[f"unet.{block}.transformer_blocks.0.ff.net.2.lora.up.weight"] = u
    for i in range(2):
        for proj in ("q_proj", "out_proj"):
            d, u = _pair(te_mods[f"encoder.layers.{i}.self_attn.{proj}"].weight, g)
            key = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{proj}.lora_linear_layer"
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = d, u
    src = tmp_path / "old_lora.safetensors"
    save_file(sd, str(src))
    stored = _import(src, sd1_shapes, tmp_path)
    reference = _image_with(tiny_random_pipeline_dir, src)
    assert np.abs(reference - generate(load_pipe(tiny_random_pipeline_dir))).max() > 1e-3
    assert np.array_equal(_image_with(tiny_random_pipeline_dir, stored), reference)


def _pair(weight: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(4, weight.shape[1], generator=g) * 0.3, torch.randn(weight.shape[0], 4, generator=g) * 0.3


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_kohya_export_import_identical_image(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base: Path = request.getfixturevalue("tiny_random_pipeline_dir" if arch == "sd1" else "tiny_sdxl_dir")
    shapes: BaseModelShapes = request.getfixturevalue(f"{arch}_shapes")
    if arch == "sd1":
        stored = _import(_peft_lora_file(base, tmp_path / "ours.safetensors"), shapes, tmp_path)
    else:
        write_kohya(load_pipe(base), tmp_path / "k.safetensors", sdxl=True, alpha=3.0, dtype=torch.float32)
        stored = _import(tmp_path / "k.safetensors", shapes, tmp_path)
    original = _image_with(base, stored)

    exported = export_lora(stored, shapes, "kohya", tmp_path / "export.safetensors", "my-style", trigger="sks")
    keys = load_file(str(exported))
    meta = read_metadata(exported)
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in keys)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.title"] == "my-style" and meta["modelspec.trigger_phrase"] == "sks"
    if arch == "sd1":
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"  # scale folded into up
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    else:
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_up.weight" in keys
        assert any(k.startswith("lora_te2_text_model_encoder_layers_1") for k in keys)

    back = tmp_path / "back"
    back.mkdir()
    again = _import(exported, shapes, back)
    assert np.array_equal(_image_with(base, again), original)
    if arch == "sd1":  # and the export reads back identically in diffusers itself
        assert np.array_equal(_image_with(base, exported), original)


def test_kohya_conv_layers_bit_exact_and_exported_with_conv_args(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    """kohya conv LoRA (LoCon-style 3x3 down, 1x1 up) on resnets, resamplers and time embeddings."""
    pipe = load_pipe(tiny_random_pipeline_dir)
    kohya = tmp_path / "locon.safetensors"
    sd = write_kohya(pipe, kohya, sdxl=False, dtype=torch.float32)
    mods = dict(pipe.unet.named_modules())
    g = torch.Generator().manual_seed(9)
    for path in ("down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.1.conv2", "down_blocks.0.downsamplers.0.conv",
                 "up_blocks.0.upsamplers.0.conv", "mid_block.resnets.0.time_emb_proj",
                 "up_blocks.0.resnets.0.conv_shortcut"):
        w = mods[path].weight
        name = "lora_unet_" + path.replace(".", "_")
        up_extra = (1, 1) if w.ndim == 4 else ()
        sd[f"{name}.lora_down.weight"] = torch.randn(2, *w.shape[1:], generator=g) * 0.1
        sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2, *up_extra, generator=g) * 0.1
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(kohya))
    stored = _import(kohya, sd1_shapes, tmp_path)
    assert np.array_equal(_image_with(tiny_random_pipeline_dir, stored), _image_with(tiny_random_pipeline_dir, kohya))
    exported = export_lora(stored, sd1_shapes, "kohya", tmp_path / "out.safetensors", "locon")
    assert read_metadata(exported)["ss_network_args"] == '{"conv_dim": "2", "conv_alpha": "2"}'
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in load_file(str(exported))
