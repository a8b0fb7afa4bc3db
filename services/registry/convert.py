"""Manifest <-> protobuf conversion for the registry's messages (RegistryService, and TrainingService for datasets)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from atelier_api.v1 import common_pb2, registry_pb2
from services.common.errors import InvalidInput
from services.registry.manifests import (
    AdapterKindName,
    AdapterManifest,
    AdapterSummary,
    BaseModelManifest,
    DatasetManifest,
    FileRecord,
)
from services.registry.refs import AdapterRef

KIND_TO_PROTO: dict[AdapterKindName, int] = {
    "LORA": common_pb2.ADAPTER_KIND_LORA,
    "TEXTUAL_INVERSION": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
    "DREAMBOOTH": common_pb2.ADAPTER_KIND_DREAMBOOTH,
}
_PROTO_TO_KIND = {v: k for k, v in KIND_TO_PROTO.items()}

FORMAT_NAMES: dict[int, str] = {
    registry_pb2.ADAPTER_FORMAT_UNSPECIFIED: "",
    registry_pb2.ADAPTER_FORMAT_DIFFUSERS: "diffusers",
    registry_pb2.ADAPTER_FORMAT_KOHYA: "kohya",
    registry_pb2.ADAPTER_FORMAT_A1111: "a1111",
    registry_pb2.ADAPTER_FORMAT_CHECKPOINT: "checkpoint",
}


def kind_from_proto(value: int, field: str = "kind") -> AdapterKindName | None:
    """None for UNSPECIFIED; InvalidInput for numbers the contract does not define."""
    if value == common_pb2.ADAPTER_KIND_UNSPECIFIED:
        return None
    if value not in _PROTO_TO_KIND:
        raise InvalidInput(field, f"unknown adapter kind {value}")
    return _PROTO_TO_KIND[value]


def format_from_proto(value: int, field: str = "format") -> str:
    """'' for UNSPECIFIED, else the format's short name ('diffusers', 'kohya', ...)."""
    if value not in FORMAT_NAMES:
        raise InvalidInput(field, f"unknown adapter format {value}")
    return FORMAT_NAMES[value]


def ref_from_proto(ref: common_pb2.AdapterRef, tenant: str, field: str = "ref") -> AdapterRef:
    """The caller's (`tenant`'s) reference an AdapterRef message names; neither selector means latest."""
    if not ref.name:
        raise InvalidInput(f"{field}.name", "must not be empty")
    selector = ref.WhichOneof("selector")
    if selector == "version":
        if ref.version < 1:
            raise InvalidInput(f"{field}.version", "must be a version number >= 1")
        return AdapterRef(tenant, ref.name, version=ref.version)
    if selector == "alias":
        return AdapterRef(tenant, ref.name, alias=ref.alias or None)
    return AdapterRef(tenant, ref.name)


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def file_to_proto(record: FileRecord) -> common_pb2.FileEntry:
    return common_pb2.FileEntry(path=record.path, sha256=record.sha256, size=record.size)


def adapter_version_to_proto(m: AdapterManifest) -> common_pb2.AdapterVersion:
    return common_pb2.AdapterVersion(
        tenant=m.tenant,
        name=m.name,
        version=m.version,
        kind=KIND_TO_PROTO[m.kind],  # type: ignore[arg-type]
        base_model=m.base_model,
        base_model_digest=m.base_model_digest,
        files=[file_to_proto(f) for f in m.files],
        trigger_tokens=m.trigger_tokens,
        training_config=struct(m.training_config),
        metrics=m.metrics,
        source_job_id=m.source_job_id,
        created_at=timestamp(m.created_at),
        source_format=m.source_format,
        description=m.description,
        size_bytes=m.size_bytes,
        manifest_digest=m.manifest_digest,
        base_family=m.base_family,
    )


def adapter_summary_to_proto(s: AdapterSummary) -> common_pb2.Adapter:
    return common_pb2.Adapter(
        tenant=s.tenant,
        name=s.name,
        kind=KIND_TO_PROTO[s.kind],  # type: ignore[arg-type]
        base_model=s.base_model,
        latest_version=s.latest_version,
        aliases=s.aliases,
        created_at=timestamp(s.created_at),
        updated_at=timestamp(s.updated_at),
    )


def base_model_to_proto(m: BaseModelManifest) -> common_pb2.BaseModel:
    return common_pb2.BaseModel(
        name=m.name,
        digest=m.digest,
        files=[file_to_proto(f) for f in m.files],
        architecture=m.architecture,
        size_bytes=m.size_bytes,
        description=m.description,
        created_at=timestamp(m.created_at),
        version=m.version,
        family=m.family,
    )


def dataset_to_proto(m: DatasetManifest) -> common_pb2.Dataset:
    return common_pb2.Dataset(
        tenant=m.tenant,
        id=m.id,
        name=m.name,
        images=[
            common_pb2.DatasetImage(
                index=i.index,
                filename=i.filename,
                sha256=i.sha256,
                size=i.size,
                width=i.width,
                height=i.height,
                caption=i.caption,
            )
            for i in m.images
        ],
        total_bytes=m.total_bytes,
        created_at=timestamp(m.created_at),
    )
