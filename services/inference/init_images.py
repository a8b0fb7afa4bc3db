"""GenerationSpec.init_image / strength / mask_image -> decoded images for img2img and inpainting.

Decoding reuses the dataset upload checks (`services.common.images.decode_image`): PNG, JPEG
or WebP only, the decompression-bomb guard read from the header before any pixel is decoded,
truncated data refused. The guard here is the smaller of `max_image_pixels` and
`max_image_side`², since nothing larger could be served anyway.

Sizes: the init image's size *is* the output size. Its sides must be multiples of 8 and at most
`max_image_side`; `spec.width`/`spec.height`, when set, must equal it, and the mask must have
the same size. The server never resamples: a silent resize would make the output depend on a
resampling filter the client did not choose. Pixels are taken as stored (EXIF orientation is not
applied); the init image is converted to RGB, the mask to greyscale ("L"), which is what
diffusers' processors do with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.config import Settings
from services.common.errors import InvalidInput, Violations
from services.common.images import convert_pixels, decode_image

if TYPE_CHECKING:
    from PIL.Image import Image as PilImage

# diffusers' own defaults: StableDiffusionImg2ImgPipeline 0.8, StableDiffusionInpaintPipeline 1.0.
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}


@dataclass(frozen=True)
class InitImageFields:
    """The conditioning fields of a GenerationSpec as given (`strength` None when unset)."""

    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float | None = None
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class InitImages:
    """The decoded conditioning images of one request (all None / 0 for text-to-image)."""

    image: PilImage | None = None
    mask: PilImage | None = None
    strength: float = 1.0
    width: int = 0
    height: int = 0


def check_init_images(spec: InitImageFields, steps: int, settings: Settings, errors: Violations) -> InitImages:
    """Validate the img2img/inpainting fields (adding violations to `errors`) and decode them."""
    if not spec.init_image:
        if spec.mask_image:
            errors.add("spec.mask_image", "needs spec.init_image (inpainting repaints part of an init image)")
        if spec.strength is not None:
            errors.add("spec.strength", "only meaningful with spec.init_image")
        return InitImages()
    strength = spec.strength
    if strength is None:
        strength = DEFAULT_STRENGTH["inpaint" if spec.mask_image else "img2img"]
    _check_strength(strength, steps, errors)
    max_pixels = min(settings.max_image_pixels, settings.max_image_side ** 2)
    image = _decode(spec.init_image, "spec.init_image", "RGB", max_pixels, errors)
    mask = _decode(spec.mask_image, "spec.mask_image", "L", max_pixels, errors) if spec.mask_image else None
    if image is None:
        return InitImages()
    width, height = image.size
    if width % 8 or height % 8:
        errors.add("spec.init_image", f"{width}x{height}: both sides must be multiples of 8")
    elif max(width, height) > settings.max_image_side:
        errors.add("spec.init_image", f"{width}x{height}: at most {settings.max_image_side} pixels a side")
    for field, given, actual in (("spec.width", spec.width, width), ("spec.height", spec.height, height)):
        if given and given != actual:
            errors.add(field, f"must be unset or equal the init image's {field[5:]} ({actual}), got {given}")
    if mask is not None and mask.size != image.size:
        errors.add("spec.mask_image", f"{mask.width}x{mask.height} does not match the init image's "
                                      f"{width}x{height}")
    return InitImages(image, mask, float(strength), width, height)


def _check_strength(strength: float, steps: int, errors: Violations) -> None:
    if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
        errors.add("spec.strength", f"must be within (0, 1], got {strength}")
    elif int(steps * strength) < 1:
        errors.add("spec.strength", f"{steps} steps x strength {strength:g} leaves no denoising step")


def _decode(data: bytes, field: str, mode: str, max_pixels: int, errors: Violations) -> PilImage | None:
    try:
        decoded = decode_image(data, field, max_pixels)
    except InvalidInput as exc:
        for violation in exc.violations:
            errors.add(violation.field, violation.description)
        return None
    with decoded:
        return convert_pixels(decoded, mode)
