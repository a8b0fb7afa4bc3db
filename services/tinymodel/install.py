"""Install the committed pretrained tiny-sd pipeline: copy it to a folder, optionally register it.

The asset is a plain diffusers folder; installing is a verified copy (safetensors weights and
json/txt configs only, so a stray pickle in a working tree can never ride along), and importing
hands the copy to the registry, which stores every file as a content-addressed blob.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from services.common.errors import FailedPrecondition
from services.registry.manifests import BaseModelManifest
from services.registry.registry import Registry
from services.tinymodel.assets import PRETRAINED_DIR

ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md")
REQUIRED = ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt")


def check_asset(folder: Path = PRETRAINED_DIR) -> None:
    """FailedPrecondition unless `folder` holds a complete tiny-sd pipeline."""
    missing = [rel for rel in REQUIRED if not (folder / rel).is_file()]
    if missing:
        raise FailedPrecondition(f"tiny-sd pipeline at {folder} is incomplete: missing {', '.join(missing)}")


def install_pretrained(out_dir: Path, source: Path = PRETRAINED_DIR, overwrite: bool = True) -> Path:
    """Copy the pretrained pipeline to out_dir (replacing an earlier copy) and return out_dir."""
    check_asset(source)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FailedPrecondition(f"{out_dir} already exists")
        shutil.rmtree(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix in ALLOWED_SUFFIXES:
            target = staging / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    staging.rename(out_dir)  # readers never see a half-copied pipeline
    return out_dir


def import_into_registry(registry: Registry, folder: Path, name: str = "tiny-sd") -> BaseModelManifest:
    """Store the pipeline folder in the registry as base model `name`."""
    check_asset(folder)
    description = "Atelier tiny SD (pretrained on synthetic shapes)"
    return registry.base_models.import_folder(name, folder, description=description)
