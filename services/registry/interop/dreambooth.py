"""DreamBooth artifact (trained `unet/` [+ `text_encoder/`] folders) -> shareable pipelines.

Two exports:
- a complete diffusers folder (base model files with the trained components swapped in),
  shipped as one uncompressed zip so it travels through a single-file stream; weights do
  not compress, and an uncompressed zip can be unpacked by every OS without extra tools;
- a single original-layout checkpoint `.safetensors` for A1111/ComfyUI (see checkpoint.py).
"""

from __future__ import annotations

import json
import shutil
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition
from services.registry.interop.checkpoint import convert_text_encoders, convert_unet, convert_vae
from services.registry.interop.kohya import key_map
from services.registry.interop.shapes import BaseModelShapes

TRAINABLE = ("unet", "transformer", "text_encoder", "text_encoder_2")  # every family's trainable components


def assemble_pipeline(base_dir: Path, trained_dir: Path, out_dir: Path) -> list[str]:
    """Copy the base pipeline into out_dir and replace each component trained_dir has.

    Returns the replaced component names. Component folders are replaced whole, so a base
    stored as .bin plus a trained .safetensors never leave two weight files side by side.
    """
    shutil.copytree(base_dir, out_dir, dirs_exist_ok=False)
    replaced = []
    for comp in TRAINABLE:
        src = trained_dir / comp
        if not src.is_dir():
            continue
        if not (out_dir / comp).is_dir():
            raise FailedPrecondition(f"trained component {comp!r} does not exist in the base model", "ref")
        shutil.rmtree(out_dir / comp)
        shutil.copytree(src, out_dir / comp)
        replaced.append(comp)
    if not replaced:
        raise FailedPrecondition(
            "the DreamBooth artifact has no trained unet/ or text_encoder/ folder (nor transformer/)", "ref"
        )
    return replaced


def zip_folder(folder: Path, dest: Path) -> None:
    """Uncompressed zip of `folder` with paths relative to it, in sorted order (reproducible)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo(str(path.relative_to(folder)), date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with open(path, "rb") as src, zf.open(info, "w") as out:
                shutil.copyfileobj(src, out, 1024 * 1024)


def _component_state(folder: Path) -> dict[str, torch.Tensor]:
    """All safetensors shards of one component folder; pickled weights are refused."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FailedPrecondition(f"{folder.name}/ has no .safetensors weights (pickle weights are not read)", "ref")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def write_single_file(pipeline_dir: Path, shapes: BaseModelShapes, dest: Path, title: str) -> None:
    """Write an A1111/ComfyUI checkpoint of a complete diffusers pipeline folder."""
    vae_cfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
    unet_cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    te2_dir = pipeline_dir / "text_encoder_2"
    tensors = {
        **convert_unet(_component_state(pipeline_dir / "unet"), unet_cfg),
        **convert_vae(_component_state(pipeline_dir / "vae"), len(vae_cfg.get("up_block_types", []))),
        **convert_text_encoders(
            shapes.architecture,
            _component_state(pipeline_dir / "text_encoder"),
            _component_state(te2_dir) if te2_dir.is_dir() else None,
        ),
    }
    resolution = int(unet_cfg.get("sample_size", 64)) * 8
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": key_map(shapes).spec(shapes.architecture)["architecture"],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.now(UTC).date().isoformat(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest), metadata=meta)
