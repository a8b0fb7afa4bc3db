"""Upload checks on real encoded images: formats, bombs, truncation, sizes, counts, bytes."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training.datasets import UploadedImage, validate_dataset

SETTINGS = Settings(max_dataset_images=4, max_dataset_bytes=200_000, max_image_pixels=1_000_000,
                    min_image_side=64)


def encode(fmt: str, size: tuple[int, int] = (80, 72), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 90)).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, followed by a tiny IDAT: a bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(
        b"IEND", b""
    )


def up(data: bytes, index: int = 0, caption: str = "") -> UploadedImage:
    return UploadedImage(index, f"img{index}.bin", caption, data)


def field_of(images: list[UploadedImage]) -> str:
    with pytest.raises(InvalidInput) as err:
        validate_dataset(images, SETTINGS)
    return err.value.violations[0].field


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_report_their_size(fmt: str) -> None:
    [valid] = validate_dataset([up(encode(fmt), caption="a sks dog")], SETTINGS)
    assert (valid.width, valid.height, valid.format, valid.caption) == (80, 72, fmt, "a sks dog")


def test_other_formats_and_non_images_are_refused() -> None:
    good = encode("PNG")
    assert field_of([up(good, 0), up(encode("GIF"), 1)]) == "images[1]"
    assert field_of([up(good, 0), up(good, 1), up(b"hello, not an image", 2)]) == "images[2]"
    assert field_of([up(b"", 0)]) == "images[0]"


def test_truncated_file_fails_on_full_decode() -> None:
    data = encode("PNG", (200, 200))
    noisy = io.BytesIO()
    Image.effect_noise((200, 200), 64).convert("RGB").save(noisy, format="JPEG")
    assert field_of([up(data, 0), up(noisy.getvalue()[: len(noisy.getvalue()) // 2], 1)]) == "images[1]"
    assert field_of([up(data[: len(data) // 2], 0)]) == "images[0]"


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 30000 x 30000 = 900 Mpx claimed by a ~60-byte file: refused before any decode.
    with pytest.raises(InvalidInput) as err:
        validate_dataset([up(encode("PNG"), 0), up(png_header_only(30_000, 30_000), 1)], SETTINGS)
    assert err.value.violations[0].field == "images[1]"
    assert "decompression bomb" in err.value.violations[0].description
    # Over our own (lower) limit but under Pillow's default one: still refused.
    assert field_of([up(png_header_only(1100, 1000), 0)]) == "images[0]"


def test_small_images_are_refused() -> None:
    assert field_of([up(encode("PNG", (64, 64)), 0), up(encode("PNG", (200, 63)), 1)]) == "images[1]"


def test_count_limits() -> None:
    with pytest.raises(InvalidInput) as err:
        validate_dataset([], SETTINGS)
    assert err.value.violations[0].field == "images"
    assert field_of([up(encode("PNG"), i) for i in range(5)]) == "images[4]"


def test_total_bytes_limit_names_the_image_that_crosses_it() -> None:
    big = io.BytesIO()
    noise = random.Random(0).randbytes(150 * 150 * 3)  # incompressible: ~68 KB as PNG
    Image.frombytes("RGB", (150, 150), noise).save(big, format="PNG")
    assert 2 * len(big.getvalue()) <= 200_000 < 3 * len(big.getvalue())
    assert field_of([up(big.getvalue(), i) for i in range(3)]) == "images[2]"


def test_bad_filenames_and_captions_name_the_subfield() -> None:
    image = UploadedImage(0, "../etc/passwd", "", encode("PNG"))
    assert field_of([image]) == "images[0].filename"
    assert field_of([up(encode("PNG"), 0, caption="x" * 1001)]) == "images[0].caption"
