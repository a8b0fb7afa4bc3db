"""Interop per model family (SDXL, Flux): foreign files made by an independent path.

Export: a diffusers-format LoRA (PEFT on the tiny pipeline, saved by the pipeline class's
save_lora_weights) -> our import -> our kohya export -> plain diffusers `load_lora_weights`
(its own kohya converter) must generate the same image as loading the original file.
Import: kohya / ComfyUI files derived from the diffusers file by hand-written rules
(tests/unit/interop_families_support.py) must come back as the original tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition
from services.families import FAMILIES, SD1
from services.registry.interop import export_embedding, export_lora, import_file
from services.registry.interop.api import read_metadata
from services.registry.interop.shapes import BaseModelShapes
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from tests.unit import interop_families_support as fam

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shapes(tiny_family_dirs: dict[str, Path]) -> dict[str, BaseModelShapes]:
    return {f: BaseModelShapes.from_dir(tiny_family_dirs[f], name=f"tiny-{f}") for f in ("sdxl", "flux")}


def _import(src: Path, shapes: BaseModelShapes, tmp: Path, name: str = "work") -> tuple[Path, str, str]:
    work = tmp / name
    work.mkdir(exist_ok=True)
    result = import_file(src, src.name, shapes, work)
    assert result.kind == "LORA"
    return result.files[LORA_WEIGHTS_FILE], result.source_format, result.variant


def _loaded(base: Path, lora: dict[str, torch.Tensor] | Path) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """(image, LoRA parameters) of a plain diffusers pipeline that loaded `lora`."""
    pipe = fam.load_pipe(base)
    pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora))
    return fam.generate(pipe), fam.lora_params(pipe)


def _same_as_reference(got: tuple[np.ndarray, dict[str, torch.Tensor]],
                       reference: tuple[np.ndarray, dict[str, torch.Tensor]]) -> None:
    """Same LoRA modules with equal weights in the loaded pipelines, and the same image."""
    assert set(got[1]) == set(reference[1]) and len(reference[1]) > 0
    assert all(torch.equal(got[1][k], v) for k, v in reference[1].items())
    assert np.array_equal(got[0], reference[0])


def test_families_are_read_from_the_base_model(shapes: dict[str, BaseModelShapes]) -> None:
    sdxl, flux = shapes["sdxl"], shapes["flux"]
    assert (sdxl.family, sdxl.denoiser, sdxl.architecture) == ("sdxl", "unet", "sdxl")
    assert (flux.family, flux.denoiser, flux.resolution) == ("flux", "transformer", 32)
    assert set(flux.modules) == {"transformer", "text_encoder"}  # T5 takes neither LoRA nor TI
    assert flux.embedding_dims == {"text_encoder": 32}


def test_sdxl_kohya_export_loads_in_diffusers_and_kohya_import_is_exact(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    base = tiny_family_dirs["sdxl"]
    original = fam.write_diffusers_lora("sdxl", base, tmp_path)
    stored, fmt, _ = _import(original, shapes["sdxl"], tmp_path)
    assert fmt == "diffusers"
    exported = export_lora(stored, shapes["sdxl"], "kohya", tmp_path / "out.safetensors", "style")
    kohya = load_file(str(exported))
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_",
                             "lora_te1_text_model_", "lora_te2_text_model_")) for k in kohya)
    meta = read_metadata(exported)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"

    reference = _loaded(base, original)
    assert np.abs(reference[0] - fam.generate(fam.load_pipe(base))).max() > 1e-3, "the LoRA must change the image"
    _same_as_reference(_loaded(base, kohya), reference)  # diffusers' own kohya converter

    hand = tmp_path / "hand_kohya.safetensors"
    save_file(fam.sdxl_to_kohya(load_file(str(original))), str(hand))
    _same_as_reference(_loaded(base, hand), reference)  # the test's kohya rule is what diffusers reads
    back, fmt, variant = _import(hand, shapes["sdxl"], tmp_path, "back")
    assert (fmt, variant) == ("kohya", "sgm")
    assert fam.peft_equal(load_file(str(back)), load_file(str(original)))


def test_flux_kohya_export_loads_in_diffusers(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    """Double blocks (fused img/txt qkv), single-block linear2/modulation and CLIP-L, as diffusers
    reads them (its kohya reader hard-codes Flux.1's 3072-wide linear1, tested below instead)."""
    base = tiny_family_dirs["flux"]
    original = fam.write_diffusers_lora("flux", base, tmp_path)
    stored, _, _ = _import(original, shapes["flux"], tmp_path)
    assert fam.peft_equal(load_file(str(stored)), load_file(str(original)))
    exported = export_lora(stored, shapes["flux"], "kohya", tmp_path / "out.safetensors", "style")
    kohya = load_file(str(exported))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"].shape == (96, 3 * fam.RANK)
    assert "lora_unet_single_blocks_1_modulation_lin.alpha" in kohya
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in kohya)
    meta = read_metadata(exported)
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"

    reference = _loaded(base, original)
    assert np.abs(reference[0] - fam.generate(fam.load_pipe(base))).max() > 1e-3, "the LoRA must change the image"
    _same_as_reference(_loaded(base, kohya), reference)


def test_flux_kohya_and_comfy_imports_give_back_the_diffusers_tensors(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    """Every fused module (linear1 = q|k|v|mlp included): files by the hand-written BFL rule import
    as the original tensors; our export of them imports back unchanged."""
    original = fam.write_diffusers_lora("flux", tiny_family_dirs["flux"], tmp_path, fused_single=True)
    sd = load_file(str(original))
    kohya, comfy = tmp_path / "kohya.safetensors", tmp_path / "comfy.safetensors"
    save_file(fam.flux_to_kohya(sd, 1, 2), str(kohya))
    save_file({**fam.flux_to_comfy(sd, 1, 2), **{k: v for k, v in sd.items() if k.startswith("text_encoder.")}},
              str(comfy))
    renamed = tmp_path / "diffusion_model_diffusers_names.safetensors"  # diffusers paths under the BFL prefix
    save_file({k.replace("transformer.", "diffusion_model.", 1): v for k, v in sd.items()}, str(renamed))
    from_kohya, fmt, kohya_variant = _import(kohya, shapes["flux"], tmp_path, "k")
    from_comfy, fmt2, variant = _import(comfy, shapes["flux"], tmp_path, "c")
    assert (fmt, kohya_variant, fmt2, variant) == ("kohya", "bfl", "diffusers", "original-names")
    assert fam.peft_equal(load_file(str(from_kohya)), sd)
    assert fam.peft_equal(load_file(str(from_comfy)), sd)
    assert fam.peft_equal(load_file(str(_import(renamed, shapes["flux"], tmp_path, "r")[0])), sd)

    exported = export_lora(from_kohya, shapes["flux"], "kohya", tmp_path / "again.safetensors", "style")
    linear1 = load_file(str(exported))["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert linear1.shape == (3 * 32 + 128, 4 * fam.RANK)
    again, _, _ = _import(exported, shapes["flux"], tmp_path, "again")
    assert fam.peft_equal(load_file(str(again)), sd)


def test_flux_lora_on_the_family_targets_round_trips(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    """The Flux family's default LoRA targets (attention only: single blocks without proj_mlp):
    linear1 is exported with a zero proj_mlp block, which the import drops again."""
    from services.families import FLUX

    pipe = fam.load_pipe(tiny_family_dirs["flux"])
    targets = [n for n, m in pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(FLUX.lora_targets)]
    original = fam.write_diffusers_lora("flux", tiny_family_dirs["flux"], tmp_path, denoiser_targets=targets)
    stored, _, _ = _import(original, shapes["flux"], tmp_path)
    exported = export_lora(stored, shapes["flux"], "kohya", tmp_path / "out.safetensors", "style")
    up = load_file(str(exported))["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (224, 4 * fam.RANK) and not torch.count_nonzero(up[96:])
    back, _, _ = _import(exported, shapes["flux"], tmp_path, "back")
    assert fam.peft_equal(load_file(str(back)), load_file(str(original)))


def test_flux_onetrainer_layout_matches_diffusers(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    """`lora_transformer_<flattened diffusers path>` (diffusers reads only its attention modules)."""
    base = tiny_family_dirs["flux"]
    pipe = fam.load_pipe(base)
    attention = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    targets = [n for n, m in pipe.transformer.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(attention)]
    original = fam.write_diffusers_lora("flux", base, tmp_path, denoiser_targets=targets)
    mixture = tmp_path / "onetrainer.safetensors"
    save_file(fam.flux_to_mixture(load_file(str(original))), str(mixture))
    _same_as_reference(_loaded(base, mixture), _loaded(base, original))
    stored, fmt, _ = _import(mixture, shapes["flux"], tmp_path)
    assert fmt == "kohya" and fam.peft_equal(load_file(str(stored)), load_file(str(original)))


def test_flux_shared_down_fused_module_splits_rows(shapes: dict[str, BaseModelShapes], tmp_path: Path) -> None:
    """sd-scripts without split_qkv: one down for q|k|v|mlp, up rows in BFL order; alpha/rank kept."""
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=g), torch.randn(224, 4, generator=g)
    name = "lora_unet_single_blocks_1_linear1"
    src = tmp_path / "shared.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(src))
    stored = load_file(str(_import(src, shapes["flux"], tmp_path)[0]))
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    rows = dict(zip(parts, torch.split(up, [32, 32, 32, 128]), strict=True))
    for part, block in rows.items():
        key = f"transformer.single_transformer_blocks.1.{part}"
        delta = stored[f"{key}.lora_B.weight"].float() @ stored[f"{key}.lora_A.weight"].float()
        assert torch.allclose(delta, block @ down * 0.5, atol=1e-6)


def test_flux_final_layer_swaps_shift_and_scale(shapes: dict[str, BaseModelShapes], tmp_path: Path) -> None:
    """BFL's final AdaLN emits (shift, scale), diffusers' norm_out (scale, shift): diffusers' swap_scale_shift."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, 32, generator=g), torch.randn(64, 2, generator=g)
    name = "lora_unet_final_layer_adaLN_modulation_1"
    src = tmp_path / "final.safetensors"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, str(src))
    stored_path = _import(src, shapes["flux"], tmp_path)[0]
    stored = load_file(str(stored_path))
    assert torch.equal(stored["transformer.norm_out.linear.lora_B.weight"], swap_scale_shift(up))
    exported = load_file(str(export_lora(stored_path, shapes["flux"], "kohya", tmp_path / "o.safetensors", "t")))
    assert torch.equal(exported[f"{name}.lora_up.weight"], up)


def test_family_mismatches_and_missing_key_maps_are_failed_precondition(
    shapes: dict[str, BaseModelShapes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdxl_name = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"
    src = tmp_path / "sdxl.safetensors"
    save_file({f"{sdxl_name}.lora_down.weight": torch.zeros(4, 64), f"{sdxl_name}.lora_up.weight": torch.zeros(64, 4)},
              str(src))
    with pytest.raises(FailedPrecondition, match=f"^{sdxl_name}.lora_down.weight: no transformer module named"):
        _import(src, shapes["flux"], tmp_path)
    t5 = tmp_path / "t5.safetensors"
    te2 = "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    save_file({f"{te2}.lora_down.weight": torch.zeros(4, 32), f"{te2}.lora_up.weight": torch.zeros(32, 4)}, str(t5))
    with pytest.raises(FailedPrecondition, match="LoRA on text_encoder_2 is not supported for Flux"):
        _import(t5, shapes["flux"], tmp_path)

    monkeypatch.setitem(FAMILIES, "nokeymap", dataclasses.replace(SD1, name="nokeymap", title="No Key Map"))
    odd = dataclasses.replace(shapes["sdxl"], family="nokeymap")
    with pytest.raises(FailedPrecondition, match=r"No Key Map \(nokeymap\), which has no key map") as err:
        _import(src, odd, tmp_path)
    assert err.value.field_name == "base_model"


def test_sdxl_ti_round_trip_and_flux_clip_l_only(shapes: dict[str, BaseModelShapes], tmp_path: Path) -> None:
    vectors = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 32)}
    src = tmp_path / "toy.safetensors"
    save_file(vectors, str(src))
    work = tmp_path / "w"
    work.mkdir()
    result = import_file(src, src.name, shapes["sdxl"], work)
    assert (result.kind, result.source_format, result.trigger_tokens) == ("TEXTUAL_INVERSION", "a1111", ["toy"])
    out = export_embedding(result.files[TI_EMBEDS_FILE], shapes["sdxl"], "a1111", tmp_path / "o.safetensors", "toy")
    assert all(torch.equal(load_file(str(out))[k], v) for k, v in vectors.items())

    clip_l = tmp_path / "flux-toy.safetensors"
    save_file({"clip_l": vectors["clip_l"]}, str(clip_l))
    work2 = tmp_path / "w2"
    work2.mkdir()
    flux = import_file(clip_l, clip_l.name, shapes["flux"], work2)
    assert flux.trigger_tokens == ["flux-toy"]
    assert torch.equal(load_file(str(flux.files[TI_EMBEDS_FILE]))["flux-toy"], vectors["clip_l"])
    with pytest.raises(FailedPrecondition, match="no text_encoder_2"):
        import_file(src, src.name, shapes["flux"], work2)
    meta = read_metadata(export_embedding(flux.files[TI_EMBEDS_FILE], shapes["flux"], "a1111",
                                          tmp_path / "f.safetensors", "flux-toy"))
    assert meta["modelspec.architecture"] == "flux-1-dev/textual-inversion"


def test_flux_dreambooth_exports_a_folder_not_a_checkpoint(
    tiny_family_dirs: dict[str, Path], shapes: dict[str, BaseModelShapes], tmp_path: Path
) -> None:
    import shutil
    import zipfile

    from services.registry.interop import export_dreambooth

    base = tiny_family_dirs["flux"]
    trained = tmp_path / "trained"
    shutil.copytree(base / "transformer", trained / "transformer")
    dest = export_dreambooth(base, trained, shapes["flux"], "diffusers", tmp_path / "db.zip", "db")
    with zipfile.ZipFile(dest) as zf:
        assert {"model_index.json", "transformer/config.json", "text_encoder_2/config.json"} <= set(zf.namelist())
    with pytest.raises(FailedPrecondition, match=r"single-file checkpoints of Flux \(flux\)") as err:
        export_dreambooth(base, trained, shapes["flux"], "checkpoint", tmp_path / "db.safetensors", "db")
    assert err.value.field_name == "format"
