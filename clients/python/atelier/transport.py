"""Channel options, credentials, per-call metadata and file streaming shared by both clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from atelier_api.v1 import registry_pb2

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 60_000),
    ]


def channel_credentials(root_certificates: bytes | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates)


def call_metadata(api_key: str | None, extra: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Auth and a fresh request id (the server logs it and echoes it back) on every call."""
    metadata = [("x-request-id", uuid.uuid4().hex), *extra]
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    return tuple(metadata)


def file_chunks(path: Path) -> Iterator[bytes]:
    """A file's bytes in CHUNK_BYTES pieces, never the whole file in memory."""
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            yield chunk


def base_model_upload(name: str, folder: str | Path, description: str) -> Iterator[registry_pb2.ImportBaseModelRequest]:
    """Header, then each file of a diffusers folder as a file header followed by its chunks."""
    root = Path(folder)
    yield registry_pb2.ImportBaseModelRequest(
        header=registry_pb2.ImportBaseModelHeader(name=name, description=description)
    )
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        yield registry_pb2.ImportBaseModelRequest(
            file=registry_pb2.ImportBaseModelFile(path=relative, size=path.stat().st_size)
        )
        for chunk in file_chunks(path):
            yield registry_pb2.ImportBaseModelRequest(chunk=chunk)


def adapter_upload(header: registry_pb2.ImportAdapterHeader, path: Path) -> Iterator[registry_pb2.ImportAdapterRequest]:
    """Header, then the adapter file in chunks."""
    yield registry_pb2.ImportAdapterRequest(header=header)
    for chunk in file_chunks(path):
        yield registry_pb2.ImportAdapterRequest(chunk=chunk)
