"""Decoding untrusted image bytes: the checks every entry point that accepts images shares.

Training uploads (services/training/datasets.py) and inference's init images and masks
(services/inference/init_images.py) both decode through `decode_image`, so they refuse the same
decompression bombs, truncated files and non-images, with errors naming the caller's field.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidInput

ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})


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

    Errors are InvalidInput naming `field`.
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
