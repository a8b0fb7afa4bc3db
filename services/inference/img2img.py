"""Which diffusers pipeline runs a batch, and the keyword arguments its mode adds.

img2img and inpainting run diffusers' own Img2Img / Inpaint pipelines (SD, SDXL or Flux, picked
by `AutoPipelineFor*`), built with `from_pipe` from the pipeline the batch would run on anyway (the
base or a DreamBooth variant). `from_pipe` shares the component objects, so the LoRA mix merged
into the UNet and text encoders and the TI slots apply unchanged, and nothing is loaded twice.
The derived pipelines are cached per source pipeline (weakly: a DreamBooth variant that leaves
its tier takes its derived pipelines with it). A 4-channel (non-inpainting) UNet is fine for
inpainting: diffusers then blends the known region back into the latents after every step.

Exactness carries over: with per-image generators diffusers VAE-encodes the init images one by
one (each drawing from its own generator), the mask is applied elementwise, and the runner's
per-request UNet and per-image decode do the rest, so a request's pixels do not depend on its
companions. A batch shares one strength (it fixes the timesteps) and one mode: both are in the
batch key.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

from services.inference.pipelines import Pipeline
from services.inference.types import GenerationRequest

_AUTO = {"img2img": AutoPipelineForImage2Image, "inpaint": AutoPipelineForInpainting}
_DERIVED: weakref.WeakKeyDictionary[Any, dict[str, Pipeline]] = weakref.WeakKeyDictionary()


def pipeline_for(pipe: Pipeline, mode: str) -> Pipeline:
    """The pipeline to call for `mode` ("txt2img": `pipe` itself). Device thread only."""
    if mode == "txt2img":
        return pipe
    derived = _DERIVED.setdefault(pipe, {})
    if mode not in derived:
        made = _AUTO[mode].from_pipe(pipe)
        made.set_progress_bar_config(disable=True)
        derived[mode] = made
    return derived[mode]


def mode_kwargs(requests: Sequence[GenerationRequest], width: int, height: int,
                size_from_image: bool = True) -> dict[str, Any]:
    """Size and conditioning arguments of the pipeline call, one init image/mask per output image.

    The SD/SDXL img2img pipelines take their size from the image (validation made it the output
    size; `size_from_image`); Flux's, text-to-image and inpainting take width/height.
    """
    mode = requests[0].mode
    if mode == "txt2img":
        return {"width": width, "height": height}
    kwargs: dict[str, Any] = {
        "image": [r.init_image for r in requests for _ in range(r.num_images)],
        "strength": requests[0].strength,
    }
    if not size_from_image:
        kwargs |= {"width": width, "height": height}
    if mode == "inpaint":
        kwargs |= {"mask_image": [r.mask_image for r in requests for _ in range(r.num_images)],
                   "width": width, "height": height}
    return kwargs
