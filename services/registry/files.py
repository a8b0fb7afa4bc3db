"""Uploading a set of local files as blobs and downloading a manifest's files back, safely."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from services.common.errors import InvalidInput
from services.registry.blobs import Blobs
from services.registry.manifests import FileRecord
from services.registry.names import validate_relpath
from services.registry.safety import ensure_safetensors, refuse_pickle_content, refuse_pickle_name


def check_file(logical_path: str, local: Path, field: str) -> None:
    """Safetensors-only policy for one file about to be stored."""
    label = f"{field}[{logical_path}]"
    validate_relpath(logical_path, field)
    refuse_pickle_name(logical_path, label)
    if not local.is_file():
        raise InvalidInput(label, f"{local} is not a readable file")
    if logical_path.endswith(".safetensors"):
        ensure_safetensors(local, label)
    else:
        refuse_pickle_content(local, label)


def upload_files(blobs: Blobs, files: Mapping[str, Path], field: str) -> list[FileRecord]:
    """Check every file first (nothing is stored if one is refused), then upload them as blobs."""
    if not files:
        raise InvalidInput(field, "at least one file is required")
    for logical, local in files.items():
        check_file(logical, Path(local), field)
    return [blobs.put_file(Path(local), logical) for logical, local in sorted(files.items())]


def reupload_missing(blobs: Blobs, files: Mapping[str, Path], records: Sequence[FileRecord]) -> None:
    """After the manifest is written: put back any blob a concurrent garbage collection swept.

    The touch in `Blobs.put_file` keeps a reused blob young, but a collector that checked it
    just before the touch may still delete it; the manifest is visible now, so every later
    collection marks these blobs, and restoring them here closes that gap.
    """
    by_path = {logical: Path(local) for logical, local in files.items()}
    for record in records:
        if not blobs.exists(record.sha256):
            blobs.put_file(by_path[record.path], record.path)


def download_files(blobs: Blobs, records: Sequence[FileRecord], dest_dir: Path) -> dict[str, Path]:
    """Download each record to dest_dir/<path> (verified); returns path -> local file."""
    out: dict[str, Path] = {}
    root = dest_dir.resolve()
    for record in records:
        validate_relpath(record.path, "files")
        dest = root / record.path
        out[record.path] = blobs.download_record(record, dest)
    return out
