"""multipart/form-data -> the client-streamed requests of the upload RPCs.

Form shape, the same for every upload (so a browser `FormData` or `curl -F` works):

* text parts before the first file are the header's fields, by proto or JSON name
  (`name`, `baseModel`, `kind=LORA`...), parsed with json_format like any JSON body;
* each file part is streamed in 1 MiB messages as it is read, never held whole:
  - UploadDataset: one image per part (its filename kept); a text part `caption` applies to
    the next file part;
  - ImportAdapter: one part, the adapter file (its filename fills `header.filename`);
  - ImportBaseModel: one part per file of the diffusers folder, the part's filename being
    the relative path (`unet/config.json`); sizes are not announced (the server checks the
    manifest digests).

Anything else (a header field after a file, two adapter files, a part without a filename)
is a 400 before or while streaming.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import BodyPartReader, MultipartReader
from google.protobuf import json_format
from google.protobuf.message import Message

from atelier_api.v1 import registry_pb2, training_pb2
from services.gateway.transcode import BadHttpRequest

CHUNK_BYTES = 1024 * 1024
HEADER = "header"  # the oneof member every upload request starts with
HEADER = "header"  # the oneof member every upload request starts with

FileEmitter = Callable[[Message, BodyPartReader, "UploadState"], AsyncIterator[Message]]


class UploadState:
    """Per-request counters the emitters share (image index, pending caption, files seen)."""

    def __init__(self) -> None:
        self.files = 0
        self.caption = ""


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        chunk = await part.read_chunk(CHUNK_BYTES)
        if not chunk:
            return
        yield chunk


async def _dataset_image(_: Message, part: BodyPartReader, state: UploadState) -> AsyncIterator[Message]:
    index, caption, filename = state.files - 1, state.caption, part.filename or ""
    state.caption = ""
    sent = False
    async for chunk in _chunks(part):
        sent = True
        yield training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
            index=index, filename=filename, caption=caption, data=chunk))
    if not sent:
        yield training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
            index=index, filename=filename, caption=caption))


async def _adapter_file(_: Message, part: BodyPartReader, state: UploadState) -> AsyncIterator[Message]:
    if state.files > 1:
        raise BadHttpRequest("file", "an adapter import takes exactly one file part")
    async for chunk in _chunks(part):
        yield registry_pb2.ImportAdapterRequest(chunk=chunk)


async def _base_model_file(_: Message, part: BodyPartReader, state: UploadState) -> AsyncIterator[Message]:
    yield registry_pb2.ImportBaseModelRequest(file=registry_pb2.ImportBaseModelFile(path=part.filename or ""))
    async for chunk in _chunks(part):
        yield registry_pb2.ImportBaseModelRequest(chunk=chunk)


# Keyed by the request message: which header type and how a file part becomes messages.
UPLOADS: dict[str, FileEmitter] = {
    training_pb2.UploadDatasetRequest.DESCRIPTOR.full_name: _dataset_image,
    registry_pb2.ImportAdapterRequest.DESCRIPTOR.full_name: _adapter_file,
    registry_pb2.ImportBaseModelRequest.DESCRIPTOR.full_name: _base_model_file,
}


def _header_message(request_cls: type[Message], fields: dict[str, Any], first: BodyPartReader | None) -> Message:
    """The header from the text fields; an unset `filename` takes the first file's name."""
    header: Any = getattr(request_cls(), HEADER).__class__()
    try:
        json_format.ParseDict(fields, header)
    except json_format.ParseError as exc:
        raise BadHttpRequest("header", str(exc)) from exc
    if first is not None and "filename" in header.DESCRIPTOR.fields_by_name and not header.filename:
        header.filename = first.filename or ""
    build: Any = request_cls  # the stubs type Message() as taking no fields
    return build(header=header)


async def read_header(reader: MultipartReader, request_cls: type[Message],
                      state: UploadState) -> tuple[Message, BodyPartReader | None]:
    """Read the text parts up to the first file: the header message and that first file part."""
    fields: dict[str, Any] = {}
    while True:
        part = await reader.next()
        if part is None or not isinstance(part, BodyPartReader):
            return _header_message(request_cls, fields, None), None
        if part.filename is not None:
            return _header_message(request_cls, fields, part), part
        name, value = part.name or "", await part.text()
        if name == "caption":
            state.caption = value
        else:
            fields[name] = value


async def stream_files(reader: MultipartReader, request_cls: type[Message], header: Message,
                       first: BodyPartReader | None, state: UploadState) -> AsyncIterator[Message]:
    """The header, then every file part as request messages."""
    emit = UPLOADS[request_cls.DESCRIPTOR.full_name]
    yield header
    part = first
    while part is not None:
        if part.filename is None:
            if part.name != "caption":
                raise BadHttpRequest(part.name or "form", "header fields must come before the first file")
            state.caption = await part.text()
        else:
            if not part.filename:
                raise BadHttpRequest(part.name or "file", "a file part needs a filename")
            state.files += 1
            async for message in emit(header, part, state):
                yield message
        following = await reader.next()
        part = following if isinstance(following, BodyPartReader) else None
