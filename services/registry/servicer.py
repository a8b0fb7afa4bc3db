"""RegistryService: the registry over gRPC, scoped to the calling tenant.

Thin by design: it checks request shapes, turns protobuf into domain arguments, runs the
synchronous registry (boto3) in a worker thread and converts the result back. Errors are
the typed domain errors; the server's error interceptor maps them to status codes. Base
models are shared by all tenants, so only admin tenants may import or delete them (everyone
else: PERMISSION_DENIED, checked before any upload is read). Adapters are always looked up
under the caller's tenant, so another tenant's adapter answers NOT_FOUND like a missing one.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import grpc

from atelier_api.v1 import registry_pb2, registry_pb2_grpc
from services.common.auth import current_tenant, require_admin
from services.common.config import GiB
from services.common.errors import FailedPrecondition, InvalidInput
from services.common.server import ServiceBinding
from services.registry import convert as pc
from services.registry.adapter_export import export_adapter
from services.registry.adapter_import import LocalBaseModels, import_adapter_file
from services.registry.blobs import sha256_file
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE, AdapterManifest, FileRecord
from services.registry.names import validate_relpath
from services.registry.quotas import check_stored_bytes
from services.registry.registry import Registry

SERVICE_NAME = "atelier.v1.RegistryService"
EXPORT_CHUNK_BYTES = 1024 * 1024


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """All RegistryService RPCs over one `Registry`."""

    def __init__(
        self,
        registry: Registry,
        *,
        local_base_models: LocalBaseModels = (),
        work_dir: Path | None = None,
        max_upload_bytes: int = 8 * GiB,
        stored_bytes_quota: int = 0,
    ) -> None:
        self._registry = registry
        self._stored_bytes_quota = stored_bytes_quota  # per tenant, 0 = unlimited (quotas.py)
        # A name -> folder mapping lets imports and exports validate against local base models.
        self._local_base_models: LocalBaseModels = (
            dict(local_base_models) if isinstance(local_base_models, Mapping) else frozenset(local_base_models)
        )
        self._work_dir = work_dir
        self._max_upload_bytes = max_upload_bytes

    def _tempdir(self) -> tempfile.TemporaryDirectory[str]:
        if self._work_dir is not None:
            self._work_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix="atelier-registry-", dir=self._work_dir)

    # --- adapters -------------------------------------------------------------------
    async def ListAdapters(self, request: registry_pb2.ListAdaptersRequest, context: Any) -> Any:
        tenant = current_tenant()
        kind = pc.kind_from_proto(request.kind)
        page, token = await asyncio.to_thread(
            self._registry.adapters.list_adapters,
            tenant,
            request.page_size,
            request.page_token,
            kind=kind,
            base_model=request.base_model or None,
        )
        return registry_pb2.ListAdaptersResponse(
            adapters=[pc.adapter_summary_to_proto(s) for s in page], next_page_token=token
        )

    async def GetAdapter(self, request: registry_pb2.GetAdapterRequest, context: Any) -> Any:
        tenant = current_tenant()
        ref = pc.ref_from_proto(request.ref, tenant)
        manifest = await asyncio.to_thread(self._registry.adapters.resolve, ref)
        summary = await asyncio.to_thread(self._registry.adapters.summary, tenant, ref.name)
        return registry_pb2.GetAdapterResponse(
            adapter=pc.adapter_summary_to_proto(summary), version=pc.adapter_version_to_proto(manifest)
        )

    async def ListAdapterVersions(self, request: registry_pb2.ListAdapterVersionsRequest, context: Any) -> Any:
        tenant = current_tenant()
        page, token = await asyncio.to_thread(
            self._registry.adapters.list_versions, tenant, request.name, request.page_size, request.page_token
        )
        return registry_pb2.ListAdapterVersionsResponse(
            versions=[pc.adapter_version_to_proto(m) for m in page], next_page_token=token
        )

    async def SetAlias(self, request: registry_pb2.SetAliasRequest, context: Any) -> Any:
        tenant = current_tenant()
        expected = request.expected_version if request.HasField("expected_version") else None
        previous = await asyncio.to_thread(
            self._registry.adapters.set_alias, tenant, request.name, request.alias, request.version, expected
        )
        response = registry_pb2.SetAliasResponse(name=request.name, alias=request.alias, version=request.version)
        if previous is not None:
            response.previous_version = previous
        return response

    async def DeleteAlias(self, request: registry_pb2.DeleteAliasRequest, context: Any) -> Any:
        tenant = current_tenant()
        await asyncio.to_thread(self._registry.adapters.delete_alias, tenant, request.name, request.alias)
        return registry_pb2.DeleteAliasResponse()

    async def DeleteAdapterVersion(self, request: registry_pb2.DeleteAdapterVersionRequest, context: Any) -> Any:
        tenant = current_tenant()
        await asyncio.to_thread(self._registry.adapters.delete_version, tenant, request.name, request.version)
        return registry_pb2.DeleteAdapterVersionResponse()

    async def ImportAdapter(
        self, request_iterator: AsyncIterator[registry_pb2.ImportAdapterRequest], context: Any
    ) -> Any:
        tenant = current_tenant()
        with self._tempdir() as tmp:
            header, path = await self._receive_adapter(request_iterator, Path(tmp))
            await asyncio.to_thread(check_stored_bytes, self._registry, self._stored_bytes_quota, tenant,
                                    path.stat().st_size)
            manifest = await asyncio.to_thread(
                import_adapter_file,
                self._registry,
                tenant,
                name=header.name,
                base_model=header.base_model,
                kind_hint=pc.kind_from_proto(header.kind, "header.kind"),
                format_hint=pc.format_from_proto(header.format, "header.format"),
                filename=header.filename,
                path=path,
                description=header.description,
                trigger_token=header.trigger_token,
                local_base_models=self._local_base_models,
            )
        return registry_pb2.ImportAdapterResponse(version=pc.adapter_version_to_proto(manifest))

    async def _receive_adapter(
        self, requests: AsyncIterator[registry_pb2.ImportAdapterRequest], tmp: Path
    ) -> tuple[registry_pb2.ImportAdapterHeader, Path]:
        header: registry_pb2.ImportAdapterHeader | None = None
        path = tmp / "upload.safetensors"
        with open(path, "wb") as out:
            written = 0
            async for message in requests:
                if message.WhichOneof("payload") == "header":
                    if header is not None:
                        raise InvalidInput("header", "sent twice; send one header, then chunks")
                    header = message.header
                    continue
                if header is None:
                    raise InvalidInput("header", "the first message must be the header")
                written = self._write_chunk(out, message.chunk, written, "chunk")
        if header is None:
            raise InvalidInput("header", "missing: the stream was empty")
        if header.size and header.size != written:
            raise InvalidInput("header.size", f"announced {header.size} bytes but received {written}")
        if written == 0:
            raise InvalidInput("chunk", "the file is empty")
        return header, path

    def _write_chunk(self, out: BinaryIO, chunk: bytes, written: int, field: str) -> int:
        written += len(chunk)
        if written > self._max_upload_bytes:
            raise InvalidInput(field, f"upload exceeds {self._max_upload_bytes} bytes")
        out.write(chunk)
        return written

    async def ExportAdapter(
        self, request: registry_pb2.ExportAdapterRequest, context: Any
    ) -> AsyncIterator[registry_pb2.ExportAdapterResponse]:
        tenant = current_tenant()
        ref = pc.ref_from_proto(request.ref, tenant)
        fmt = pc.format_from_proto(request.format)
        manifest = await asyncio.to_thread(self._registry.adapters.resolve, ref)
        with self._tempdir() as tmp:
            path = await asyncio.to_thread(self._export_file, manifest, fmt, Path(tmp))
            sha, size = await asyncio.to_thread(sha256_file, path)
            yield registry_pb2.ExportAdapterResponse(
                header=registry_pb2.ExportAdapterHeader(
                    filename=path.name, size=size, sha256=sha, version=pc.adapter_version_to_proto(manifest)
                )
            )
            with open(path, "rb") as f:
                while chunk := f.read(EXPORT_CHUNK_BYTES):
                    yield registry_pb2.ExportAdapterResponse(chunk=chunk)

    def _export_file(self, manifest: AdapterManifest, fmt: str, tmp: Path) -> Path:
        """A verified local file holding the export (the stored file itself for diffusers LoRA/TI).

        DreamBooth versions hold several component folders, so even the diffusers format is
        assembled (a zipped pipeline folder) by the exporter.
        """
        if fmt in ("", "diffusers") and manifest.kind != "DREAMBOOTH":
            record = primary_file(manifest)
            return self._registry.blobs.download_record(record, tmp / Path(record.path).name)
        return export_adapter(self._registry, manifest, fmt or "diffusers", tmp, self._local_base_models)

    # --- base models ----------------------------------------------------------------
    async def ListBaseModels(self, request: registry_pb2.ListBaseModelsRequest, context: Any) -> Any:
        page, token = await asyncio.to_thread(
            self._registry.base_models.list_page, request.page_size, request.page_token
        )
        return registry_pb2.ListBaseModelsResponse(
            base_models=[pc.base_model_to_proto(m) for m in page], next_page_token=token
        )

    async def GetBaseModel(self, request: registry_pb2.GetBaseModelRequest, context: Any) -> Any:
        manifest = await asyncio.to_thread(self._registry.base_models.get, request.name)
        return registry_pb2.GetBaseModelResponse(base_model=pc.base_model_to_proto(manifest))

    async def ImportBaseModel(
        self, request_iterator: AsyncIterator[registry_pb2.ImportBaseModelRequest], context: Any
    ) -> Any:
        require_admin("importing a base model")
        with self._tempdir() as tmp:
            header = await self._receive_folder(request_iterator, Path(tmp) / "model")
            manifest = await asyncio.to_thread(
                self._registry.base_models.import_folder, header.name, Path(tmp) / "model", header.description
            )
        return registry_pb2.ImportBaseModelResponse(base_model=pc.base_model_to_proto(manifest))

    async def _receive_folder(
        self, requests: AsyncIterator[registry_pb2.ImportBaseModelRequest], root: Path
    ) -> registry_pb2.ImportBaseModelHeader:
        header: registry_pb2.ImportBaseModelHeader | None = None
        receiver = _FolderReceiver(root, self._write_chunk)
        try:
            async for message in requests:
                kind = message.WhichOneof("payload")
                if kind == "header":
                    if header is not None:
                        raise InvalidInput("header", "sent twice")
                    header = message.header
                elif header is None:
                    raise InvalidInput("header", "the first message must be the header")
                elif kind == "file":
                    receiver.start(message.file.path, message.file.size)
                else:
                    receiver.write(message.chunk)
            receiver.finish()
        finally:
            receiver.close()
        if header is None:
            raise InvalidInput("header", "missing: the stream was empty")
        return header

    async def DeleteBaseModel(self, request: registry_pb2.DeleteBaseModelRequest, context: Any) -> Any:
        require_admin("deleting a base model")
        await asyncio.to_thread(self._registry.base_models.delete, request.name)
        return registry_pb2.DeleteBaseModelResponse()


class _FolderReceiver:
    """Writes a client-streamed folder: file headers (path, size) each followed by chunks."""

    def __init__(self, root: Path, write: Callable[[BinaryIO, bytes, int, str], int]) -> None:
        self._root = root
        self._write = write
        self._out: BinaryIO | None = None
        self._path = ""
        self._expected = 0
        self._file_bytes = 0
        self._total = 0
        self._seen: set[str] = set()

    def start(self, path: str, size: int) -> None:
        self.finish()
        validate_relpath(path, "file.path")
        if path in self._seen:
            raise InvalidInput("file.path", f"{path!r} sent twice")
        self._seen.add(path)
        dest = self._root / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(dest, "wb")  # noqa: SIM115 - closed in finish()/close()
        self._path, self._expected, self._file_bytes = path, size, 0

    def write(self, chunk: bytes) -> None:
        if self._out is None:
            raise InvalidInput("file", "a chunk arrived before any file header")
        self._file_bytes += len(chunk)
        self._total = self._write(self._out, chunk, self._total, "chunk")

    def finish(self) -> None:
        if self._out is None:
            return
        self.close()
        if self._expected and self._expected != self._file_bytes:
            raise InvalidInput("file.size", f"{self._path}: announced {self._expected} bytes, got {self._file_bytes}")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def primary_file(manifest: AdapterManifest) -> FileRecord:
    """The one file a diffusers-format export streams; DreamBooth folders need a converter."""
    preferred = {"LORA": LORA_WEIGHTS_FILE, "TEXTUAL_INVERSION": TI_EMBEDS_FILE}.get(manifest.kind)
    record = manifest.file(preferred) if preferred else None
    if record is None and len(manifest.files) == 1:
        record = manifest.files[0]
    if record is None:
        raise FailedPrecondition(
            f"{manifest.ref} has {len(manifest.files)} files; export it in the CHECKPOINT format", "format"
        )
    return record


def registry_bindings(registry: Registry, **kwargs: Any) -> list[ServiceBinding]:
    """The ServiceBinding list for start_server; kwargs go to RegistryServicer."""
    servicer = RegistryServicer(registry, **kwargs)

    def register(server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)

    return [ServiceBinding(SERVICE_NAME, register)]


__all__ = ["SERVICE_NAME", "RegistryServicer", "primary_file", "registry_bindings"]
