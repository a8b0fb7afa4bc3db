"""The tiny SD base models: plain-diffusers loading, acceptance numbers, and the CLI around them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from typer.testing import CliRunner

from atelier.cli.main import app
from services.common.config import Settings
from services.common.errors import FailedPrecondition
from services.registry.registry import Registry
from services.registry.store import open_store
from services.tinymodel.assets import PRETRAINED_DIR
from services.tinymodel.evaluate import colour_control, held_out_loss
from services.tinymodel.install import install_pretrained

ASSET_LIMIT_BYTES = 20 * 1024 * 1024
ALLOWED = {".json", ".txt", ".safetensors", ".md"}


def _load(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(folder: Path) -> None:
    pipe = _load(folder)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    image = pipe("a red circle on a white background", num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)


def test_random_pipeline_loads_and_generates_in_plain_diffusers(tiny_random_pipeline_dir: Path) -> None:
    _generate(tiny_random_pipeline_dir)


def test_pretrained_pipeline_loads_and_generates_in_plain_diffusers(tiny_pretrained_pipeline_dir: Path) -> None:
    _generate(tiny_pretrained_pipeline_dir)


@pytest.mark.parametrize("which", ["random", "asset"])
def test_folders_hold_only_safe_files(which: str, tiny_random_pipeline_dir: Path) -> None:
    folder = tiny_random_pipeline_dir if which == "random" else PRETRAINED_DIR
    files = [p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {p.suffix for p in files} <= ALLOWED
    assert sum(p.stat().st_size for p in files) < ASSET_LIMIT_BYTES


def test_pretrained_meets_acceptance(tiny_random_pipeline_dir: Path, tiny_pretrained_pipeline_dir: Path) -> None:
    random_loss = held_out_loss(_load(tiny_random_pipeline_dir))
    pretrained = _load(tiny_pretrained_pipeline_dir)
    trained_loss = held_out_loss(pretrained)
    assert trained_loss <= 0.6 * random_loss, (trained_loss, random_loss)
    colours = colour_control(pretrained, seeds=10)
    # mean(R) - mean(B): see ColourResult for why the raw mean red channel is not the criterion.
    assert colours.redness_wins >= 8, colours


def test_install_refuses_an_incomplete_asset(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "model_index.json").write_text("{}")
    with pytest.raises(FailedPrecondition, match="missing"):
        install_pretrained(tmp_path / "out", source=tmp_path / "src")
    assert not (tmp_path / "out").exists()


# --- CLI -------------------------------------------------------------------------------
def _env(settings: Settings) -> dict[str, str]:
    """ATELIER_* variables that reproduce the registry part of `settings` for the CLI."""
    values = settings.model_dump()
    keys = [k for k in values if k.startswith("s3_") or k in ("registry_url", "data_dir")]
    return {f"ATELIER_{k.upper()}": str(values[k]) for k in keys if values[k] is not None}


def test_create_tiny_installs_the_pretrained_asset(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["base-model", "create-tiny", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    for rel in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "PRETRAIN.md"):
        assert (tmp_path / "m" / rel).read_bytes() == (PRETRAINED_DIR / rel).read_bytes()


def test_create_tiny_random_defaults_under_data_dir_and_imports(local_settings: Settings) -> None:
    args = ["base-model", "create-tiny", "--random", "--seed", "3", "--import"]
    result = CliRunner().invoke(app, args, env=_env(local_settings))
    assert result.exit_code == 0, result.output
    _load(local_settings.data_dir / "base-models" / "tiny-sd-random")
    assert Registry(open_store(local_settings)).base_models.get("tiny-sd-random").files


def test_create_tiny_imports_into_the_registry(registry_settings: Settings, tmp_path: Path) -> None:
    args = ["base-model", "create-tiny", "--out", str(tmp_path / "m"), "--import"]
    first = CliRunner().invoke(app, args, env=_env(registry_settings))
    assert first.exit_code == 0, first.output
    manifest = Registry(open_store(registry_settings)).base_models.get("tiny-sd")
    assert manifest.architecture == "stable-diffusion"
    assert {f.path for f in manifest.files} >= {"model_index.json", "tokenizer/merges.txt"}
    again = CliRunner().invoke(app, args, env=_env(registry_settings))  # idempotent
    assert again.exit_code == 0 and "already" in again.output and manifest.digest in again.output


def test_create_tiny_rejects_a_bad_registry_name(local_settings: Settings, tmp_path: Path) -> None:
    args = ["base-model", "create-tiny", "--out", str(tmp_path / "m"), "--import", "--name", "../Bad"]
    result = CliRunner().invoke(app, args, env=_env(local_settings))
    assert result.exit_code == 2
    assert "name" in result.output


def test_pretrain_tiny_runs_end_to_end_on_a_few_steps(tmp_path: Path) -> None:
    args = ["base-model", "pretrain-tiny", "--out", str(tmp_path / "p"), "--vae-steps", "2", "--unet-steps", "2",
            "--batch-size", "4", "--threads", "1", "--eval-images", "4", "--eval-steps", "2",
            "--prediction-type", "v_prediction"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = (tmp_path / "p" / "PRETRAIN.md").read_text()
    assert "atelier base-model pretrain-tiny --out" in report and "--unet-steps 2" in report
    assert "--prediction-type v_prediction" in report
    assert _load(tmp_path / "p").scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize(("flag", "value"), [("--resolution", "20"), ("--prediction-type", "sample")])
def test_pretrain_tiny_rejects_bad_flags(tmp_path: Path, flag: str, value: str) -> None:
    result = CliRunner().invoke(app, ["base-model", "pretrain-tiny", "--out", str(tmp_path), flag, value])
    assert result.exit_code == 2 and flag in result.output
    assert not (tmp_path / "model_index.json").exists()
