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

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from services.common.config import Settings
from services.common.errors import InvalidInput

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
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


def _open_header(data: bytes, field: str) -> Image.Image:
    """Parse only the header; PIL reads pixel data lazily, on `load()`."""
    try:
        # Pillow's own bomb check would raise (or warn) inside open(); we check explicitly
        # below with our own limit, so silence its warning and never rely on a global.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(field, f"decompression bomb refused: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(field, "not a PNG, JPEG or WebP image (could not read the header)") from exc


def decode_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Checks 1-3 of the module doc on raw bytes; returns the decoded image (caller closes it).

    Shared with inference (init images and masks) so both entry points refuse the same bombs,
    truncated files and non-images; errors name `field`.
    """
    if not data:
        raise InvalidInput(field, "empty image")
    img = _open_header(data, field)
    try:
        fmt = (img.format or "").upper()
        if fmt not in ALLOWED_FORMATS:
            raise InvalidInput(field, f"format {fmt or 'unknown'} not accepted; use PNG, JPEG or WebP")
        width, height = img.size
        if width * height > max_pixels:
            raise InvalidInput(
                field,
                f"{width}x{height} = {width * height} pixels exceeds the limit of "
                f"{max_pixels} (decompression bomb guard)",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... on bad data
            raise InvalidInput(field, f"truncated or corrupt image data: {exc}") from exc
    except BaseException:
        img.close()
        raise
    return img


_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def convert_pixels(img: Image.Image, mode: str) -> Image.Image:
    """`img.convert(mode)`, except that 16-bit (and 32-bit integer) greyscale is scaled to 8
    bits first: PIL's own conversion clips every sample above 255 to white, so a 16-bit PNG
    would train on (or start img2img from) a washed-out picture. CMYK, palette and alpha
    modes convert with PIL's standard formulas."""
    if img.mode in _WIDE_MODES:
        wide = img.convert("I")
        high = wide.getextrema()[1]
        top = 65535 if isinstance(high, int | float) and high <= 65535 else 2**31 - 1
        img = wide.point(lambda value: value * (255 / top)).convert("L")
    return img.convert(mode)


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
