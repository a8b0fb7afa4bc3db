"""Sampling with the model being trained: validation previews and prior-preservation images.

Both build the family's pipeline (`family.pipeline_class`: StableDiffusionPipeline,
StableDiffusionXLPipeline, FluxPipeline) around the live components (no copies), so what the
previews show is exactly the current adapter. Validation uses the family's preview sampler
(DPM-Solver++ with 25 steps for the DDPM families, like the reference recipes; Flux its own
flow-matching Euler); class images use the base model's own scheduler (the recipe calls the
plain pipeline), seeded so a resumed job regenerates identical images if it must.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, SchedulerMixin
from PIL import Image

from services.training.trainers.base import TrainImage
from services.training.trainers.config import TrainConfig
from services.training.trainers.models import Components

VALIDATION_STEPS = 25
CLASS_IMAGE_STEPS = 50
SAMPLE_BATCH = 4


def _base_scheduler(base_model_dir: Path) -> SchedulerMixin:
    config = DiffusionPipeline.load_config(base_model_dir)
    cls_name = config["scheduler"][1]
    scheduler_cls = getattr(diffusers, cls_name)
    return scheduler_cls.from_pretrained(base_model_dir, subfolder="scheduler")  # type: ignore[no-any-return]


def build_pipeline(comps: Components, scheduler: SchedulerMixin) -> Any:
    family = comps.family
    parts = {name: comps.models[name] for name in ("vae", *family.components)}
    parts.update({slot.tokenizer: comps.tokenizers[slot.tokenizer] for slot in family.text_encoders})
    cls = getattr(diffusers, family.pipeline_class)
    pipe: Any = cls(**parts, scheduler=scheduler, **comps.recipe.PIPELINE_EXTRAS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample(
    comps: Components,
    prompts: list[str],
    *,
    resolution: int,
    seed: int,
    steps: int,
    scheduler: SchedulerMixin,
) -> list[Image.Image]:
    """One image per prompt, in batches, with a generator seeded once for the whole call."""
    pipe = build_pipeline(comps, scheduler)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = comps.denoiser.training
    comps.denoiser.eval()
    images: list[Image.Image] = []
    try:
        for start in range(0, len(prompts), SAMPLE_BATCH):
            with comps.autocast():
                out = pipe(
                    prompts[start : start + SAMPLE_BATCH],
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    generator=generator,
                    **comps.recipe.SAMPLE_KWARGS,
                )
            images.extend(out.images)
    finally:
        comps.denoiser.train(was_training)
    return images


def validation_images(comps: Components, prompts: list[str], resolution: int, seed: int) -> list[tuple[str, bytes]]:
    """(prompt, PNG) previews with the family's preview sampler, 25 steps."""
    scheduler = comps.recipe.validation_scheduler(comps.base_model_dir)
    images = sample(comps, prompts, resolution=resolution, seed=seed, steps=VALIDATION_STEPS, scheduler=scheduler)
    return [(p, to_png(img)) for p, img in zip(prompts, images, strict=True)]


def generate_class_images(
    comps: Components, class_prompt: str, count: int, resolution: int, seed: int, out_dir: Path, start_index: int = 0
) -> list[Path]:
    """Prior-preservation images from the (untouched) base model, written as PNG files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = _base_scheduler(comps.base_model_dir)
    images = sample(
        comps, [class_prompt] * count, resolution=resolution, seed=seed, steps=CLASS_IMAGE_STEPS, scheduler=scheduler
    )
    paths = []
    for i, img in enumerate(images, start=start_index):
        path = out_dir / f"class-{i:04d}.png"
        img.save(path, format="PNG")
        paths.append(path)
    return paths


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


CLASS_IMAGES_DIR = "class_images"


def class_image_paths(
    config: TrainConfig,
    comps: Components,
    given: list[TrainImage],
    resume_dir: Path | None,
    work_dir: Path,
    resolution: int,
) -> list[TrainImage]:
    """Supplied class images, topped up to `num_class_images` with base-model samples.

    Generated images are kept in every checkpoint, so a resumed run reuses them rather than
    paying for generation again.
    """
    if not config.with_prior_preservation:
        return []
    images = list(given[: config.num_class_images])
    missing = config.num_class_images - len(images)
    if missing <= 0:
        return images
    saved = resume_dir / CLASS_IMAGES_DIR if resume_dir else None
    if saved is not None and saved.is_dir() and len(list(saved.glob("*.png"))) >= missing:
        local = work_dir / CLASS_IMAGES_DIR  # copied so the next checkpoint carries them again
        local.mkdir(parents=True, exist_ok=True)
        paths = [Path(shutil.copy2(p, local / p.name)) for p in sorted(saved.glob("*.png"))[:missing]]
    else:
        paths = generate_class_images(
            comps, config.class_prompt, missing, resolution, config.seed, work_dir / CLASS_IMAGES_DIR
        )
    return images + [TrainImage(p, config.class_prompt) for p in paths]
