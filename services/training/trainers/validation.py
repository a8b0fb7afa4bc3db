"""Sampling with the model being trained: validation previews and prior-preservation images.

Both build a `StableDiffusionPipeline` around the live components (no copies), so what the
previews show is exactly the current adapter. Validation uses DPM-Solver++ with 25 steps like
the reference recipes; class images use the base model's own scheduler (the recipe calls the
plain pipeline), seeded so a resumed job regenerates identical images if it must.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin, StableDiffusionPipeline
from PIL import Image

from services.training.trainers.models import Components

VALIDATION_STEPS = 25
CLASS_IMAGE_STEPS = 50
SAMPLE_BATCH = 4


def _base_scheduler(base_model_dir: Path) -> SchedulerMixin:
    import diffusers

    config = StableDiffusionPipeline.load_config(base_model_dir)
    cls_name = config["scheduler"][1]
    scheduler_cls = getattr(diffusers, cls_name)
    return scheduler_cls.from_pretrained(base_model_dir, subfolder="scheduler")  # type: ignore[no-any-return]


def build_pipeline(comps: Components, scheduler: SchedulerMixin) -> Any:
    pipe: Any = StableDiffusionPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        unet=comps.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
    was_training = comps.unet.training
    comps.unet.eval()
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
                )
            images.extend(out.images)
    finally:
        comps.unet.train(was_training)
    return images


def validation_images(comps: Components, prompts: list[str], resolution: int, seed: int) -> list[tuple[str, bytes]]:
    """(prompt, PNG) previews with the reference's DPM-Solver++ 25-step sampler."""
    scheduler = DPMSolverMultistepScheduler.from_pretrained(comps.base_model_dir, subfolder="scheduler")
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
