"""Model families: detection from folders and pipelines, tiny random pipelines of each family
that plain diffusers loads and runs, and the CLI that writes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from typer.testing import CliRunner

from atelier.cli.main import app
from services.common.errors import FailedPrecondition
from services.families import FAMILIES, FLUX, SD1, SDXL, by_name, detect, detect_index, mismatch, of_pipeline

EXPECTED = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_tiny_pipeline_of_each_family_loads_and_runs_in_plain_diffusers(
        tiny_family_dirs: dict[str, Path], family: str) -> None:
    folder = tiny_family_dirs[family]
    assert detect(folder).name == family
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == EXPECTED[family]
    assert of_pipeline(pipe) is FAMILIES[family]
    denoiser = getattr(pipe, FAMILIES[family].denoiser)
    assert type(denoiser).__name__ == FAMILIES[family].denoiser_class
    extra = {"max_sequence_length": 16} if family == "flux" else {}
    image = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0), **extra).images
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_detection_falls_back_to_component_classes() -> None:
    assert detect_index({"_class_name": "MyXLVariant", "unet": ["diffusers", "UNet2DConditionModel"],
                         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}) is SDXL
    assert detect_index({"_class_name": "X", "transformer": ["diffusers", "FluxTransformer2DModel"],
                         "text_encoder_2": ["transformers", "T5EncoderModel"]}) is FLUX
    assert detect_index({"_class_name": "StableDiffusionImg2ImgPipeline"}) is SD1
    with pytest.raises(FailedPrecondition, match="not of a supported model family"):
        detect_index({"_class_name": "KandinskyPipeline", "unet": ["diffusers", "UNet2DModel"]})


def test_detect_refuses_a_folder_without_model_index(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match=r"model_index\.json"):
        detect(tmp_path)


def test_mismatch_names_both_families() -> None:
    message = mismatch("sdxl", "flux").message
    assert "Stable Diffusion XL (sdxl)" in message and "Flux (flux)" in message
    with pytest.raises(FailedPrecondition, match="unknown model family"):
        by_name("sd3")


def test_family_facts_drive_textual_inversion_keys() -> None:
    assert [slot.ti_key for slot in SDXL.ti_slots] == ["clip_l", "clip_g"]
    assert [slot.encoder for slot in FLUX.ti_slots] == ["text_encoder"]  # CLIP-L only
    assert FLUX.components == ("transformer", "text_encoder", "text_encoder_2")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cli_create_tiny_family_random(tmp_path: Path, family: str) -> None:
    out = tmp_path / family
    result = CliRunner().invoke(app, ["base-model", "create-tiny", "--family", family, "--random", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == EXPECTED[family]


def test_cli_create_tiny_refuses_pretrained_for_other_families(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["base-model", "create-tiny", "--family", "flux", "--out", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "--random" in result.output
    result = CliRunner().invoke(app, ["base-model", "create-tiny", "--family", "sd3", "--random"])
    assert result.exit_code == 2 and "--family" in result.output
