"""Assembles a client-streamed dataset upload, enforcing limits while bytes arrive.

The stream is an optional header, then image chunks; consecutive chunks with the same index
are one image. Indices must run 0, 1, 2, ... so that error messages (`images[<i>]`) name
the same image the client numbered. Count and byte limits are checked as chunks arrive, so
an oversized upload is refused without buffering it all.

The servicer turns each `UploadDatasetRequest` into an `UploadHeader` or an `ImageChunk`
(services.training.convert.upload_part); nothing here reads the proto.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.training.datasets import UploadedImage


@dataclass(frozen=True)
class UploadHeader:
    """The optional first message of an upload."""

    name: str


@dataclass(frozen=True)
class ImageChunk:
    """Part of one image: chunks with the same `index` are concatenated in order."""

    index: int
    filename: str
    caption: str
    data: bytes


class UploadAssembler:
    """Feed it every part of the stream (header, image chunks), then take `name` and `images()`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.name = ""
        self._header_seen = False
        self._parts: list[tuple[str, str, bytearray]] = []
        self._total = 0

    def add(self, part: UploadHeader | ImageChunk) -> None:
        if isinstance(part, ImageChunk):
            self._add_chunk(part)
            return
        if self._header_seen or self._parts:
            raise InvalidInput("header", "the header must be the first message, sent once")
        self._header_seen = True
        self.name = part.name

    def _add_chunk(self, chunk: ImageChunk) -> None:
        index = chunk.index
        field = f"images[{index}]"
        current = len(self._parts) - 1
        if index == current + 1:
            if index >= self._settings.max_dataset_images:
                raise InvalidInput(field, f"more than {self._settings.max_dataset_images} images")
            self._parts.append((chunk.filename, chunk.caption, bytearray()))
        elif index != current:
            expected = f"{current} or {current + 1}" if current >= 0 else "0"
            raise InvalidInput(field, f"image index out of order: expected {expected} (chunks of one "
                                      "image must be consecutive, images numbered from 0)")
        filename, caption, data = self._parts[index]
        self._total += len(chunk.data)
        if self._total > self._settings.max_dataset_bytes:
            raise InvalidInput(field, f"dataset exceeds the limit of {self._settings.max_dataset_bytes} bytes")
        data.extend(chunk.data)
        # Later chunks may carry the filename/caption if the first did not.
        self._parts[index] = (filename or chunk.filename, caption or chunk.caption, data)

    def images(self) -> list[UploadedImage]:
        return [
            UploadedImage(i, filename or f"image-{i:04d}", caption, bytes(data))
            for i, (filename, caption, data) in enumerate(self._parts)
        ]
