"""Checks uploaded training images before anything is stored.

An upload is accepted whole or not at all: every image is decoded and checked first, and
only a fully valid set reaches the registry. Checks, in the order they run per image:

1. the header is a PNG, JPEG or WebP image (other formats and non-image bytes refused);
2. the pixel count read from the header is under `max_image_pixels`, *before* decoding
   any pixel data, so a decompression bomb costs a header parse, not gigabytes of RAM;
3. the full decode succeeds (a truncated file fails here, in `Image.load()`);
4. both sides are at least `min_image_side`.

Count (1..max_dataset_images) and total size are checked on the whole set. Errors are
`InvalidInput` naming the offending field as `images[<index>]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.images import decode_image

MAX_CAPTION_CHARS = 1000
MAX_FILENAME_CHARS = 255


@dataclass(frozen=True)
class UploadedImage:
    """One image as received: its upload index, name, optional caption and bytes."""

    index: int
    filename: str
    caption: str
    data: bytes


@dataclass(frozen=True)
class ValidImage:
    """An image that passed every check, with its decoded size."""

    index: int
    filename: str
    caption: str
    data: bytes
    width: int
    height: int
    format: str


def _field(index: int) -> str:
    return f"images[{index}]"


def validate_image(image: UploadedImage, settings: Settings) -> ValidImage:
    """Run the per-image checks and return the decoded dimensions."""
    field = _field(image.index)
    if not image.data:
        raise InvalidInput(field, "empty image")
    if len(image.filename) > MAX_FILENAME_CHARS or "/" in image.filename or "\\" in image.filename:
        raise InvalidInput(f"{field}.filename", f"must be a plain name of at most {MAX_FILENAME_CHARS} chars")
    if len(image.caption) > MAX_CAPTION_CHARS:
        raise InvalidInput(f"{field}.caption", f"longer than {MAX_CAPTION_CHARS} characters")
    img = decode_image(image.data, field, settings.max_image_pixels)
    try:
        fmt = (img.format or "").upper()
        width, height = img.size
        if min(width, height) < settings.min_image_side:
            raise InvalidInput(
                field, f"{width}x{height} is smaller than {settings.min_image_side} px on a side"
            )
        return ValidImage(image.index, image.filename, image.caption, image.data, width, height, fmt)
    finally:
        img.close()


def validate_dataset(images: Sequence[UploadedImage], settings: Settings) -> list[ValidImage]:
    """Check the whole upload; raise `InvalidInput` on the first bad image or limit."""
    if not images:
        raise InvalidInput("images", "a dataset needs at least one image")
    if len(images) > settings.max_dataset_images:
        raise InvalidInput(
            _field(settings.max_dataset_images),
            f"{len(images)} images exceed the limit of {settings.max_dataset_images}",
        )
    total = 0
    for image in images:
        total += len(image.data)
        if total > settings.max_dataset_bytes:
            raise InvalidInput(
                _field(image.index),
                f"dataset exceeds the limit of {settings.max_dataset_bytes} bytes at this image",
            )
    return [validate_image(image, settings) for image in images]
