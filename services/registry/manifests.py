"""The documents the registry stores: adapter, dataset, base-model and checkpoint manifests.

Manifests are JSON (pydantic models) that name content-addressed blobs by sha256. They are
written once and never modified (aliases are the only mutable documents), so a manifest's
bytes, and therefore its digest, identify exactly one version.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AdapterKindName = Literal["LORA", "TEXTUAL_INVERSION", "DREAMBOOTH"]
ADAPTER_KINDS: tuple[AdapterKindName, ...] = ("LORA", "TEXTUAL_INVERSION", "DREAMBOOTH")

# File names inside an adapter manifest, matching what diffusers loaders look for by default.
LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
TI_EMBEDS_FILE = "learned_embeds.safetensors"


def utc_now() -> datetime:
    return datetime.now(UTC)


class _Doc(BaseModel):
    # NaN/inf metrics (a diverged run) must round-trip rather than make the manifest unreadable.
    model_config = ConfigDict(extra="ignore", frozen=True, ser_json_inf_nan="constants")

    def to_json_bytes(self) -> bytes:
        """Canonical-enough serialisation: stable field order, UTF-8, no whitespace."""
        return self.model_dump_json().encode("utf-8")


class FileRecord(_Doc):
    """One file of a manifest: its relative path and the blob holding its bytes."""

    path: str
    sha256: str
    size: int


class _VersionedFiles:
    """What an immutable `name@version` manifest of files offers (adapters, base models).

    The fields belong to each subclass, in its own order (the serialised bytes, hence the
    digest, depend on it), so they are declared here only for the type checker.
    """

    if TYPE_CHECKING:
        name: str
        version: int
        files: list[FileRecord]

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def ref(self) -> str:
        """`name@version`: pinned (what a job records so every attempt uses these bytes) and
        human-readable (error messages, logs)."""
        return f"{self.name}@{self.version}"


class AdapterManifest(_VersionedFiles, _Doc):
    """An immutable adapter version: adapters/<tenant>/<name>/versions/<n>.json."""

    tenant: str
    name: str
    version: int
    kind: AdapterKindName
    base_model: str
    base_model_digest: str = ""
    # services.families name ("sd1", "sdxl", "flux") of the base it was made for; "" in
    # versions written before families were recorded (then the base model's manifest tells).
    base_family: str = ""
    files: list[FileRecord]
    trigger_tokens: list[str] = Field(default_factory=list)
    training_config: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    source_job_id: str = ""
    source_format: str = "atelier"
    description: str = ""
    created_at: datetime = Field(default_factory=utc_now)
    # sha256 of the stored document; filled in on read, never serialised.
    manifest_digest: str = Field(default="", exclude=True)

    def file(self, path: str) -> FileRecord | None:
        return next((f for f in self.files if f.path == path), None)


class AdapterSummary(_Doc):
    """One adapter name in a listing: its newest version and its aliases."""

    tenant: str
    name: str
    kind: AdapterKindName
    base_model: str
    latest_version: int
    aliases: dict[str, int] = Field(default_factory=dict)
    created_at: datetime
    updated_at: datetime


class AliasRecord(_Doc):
    """A mutable pointer: adapters/<tenant>/<name>/aliases/<alias>.json."""

    tenant: str
    name: str
    alias: str
    version: int
    updated_at: datetime = Field(default_factory=utc_now)


class DatasetImageRecord(_Doc):
    index: int
    filename: str
    sha256: str
    size: int
    width: int
    height: int
    caption: str = ""


class DatasetManifest(_Doc):
    """Uploaded training images: datasets/<tenant>/<id>.json."""

    tenant: str
    id: str
    name: str
    images: list[DatasetImageRecord]
    total_bytes: int
    created_at: datetime = Field(default_factory=utc_now)


class BaseModelManifest(_VersionedFiles, _Doc):
    """An immutable base-model version: base-models/<name>/versions/<n>.json.

    Legacy registries hold base-models/<name>/manifest.json without a version: it reads as 1.
    """

    name: str
    version: int = 1
    digest: str
    architecture: str
    family: str = ""  # services.families name; "" for versions imported before it was recorded
    files: list[FileRecord]
    description: str = ""
    created_at: datetime = Field(default_factory=utc_now)


class CheckpointManifest(_Doc):
    """Training state at one step: checkpoints/<tenant>/<job_id>/<step>.json."""

    tenant: str
    job_id: str
    step: int
    files: list[FileRecord]
    created_at: datetime = Field(default_factory=utc_now)


def files_digest(files: list[FileRecord]) -> str:
    """sha256 over the sorted (path, sha256) pairs: identifies a file set independent of order."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda r: r.path):
        h.update(f"{f.path}\0{f.sha256}\n".encode())
    return h.hexdigest()
