"""Uploaded training images: datasets/<tenant>/<id>.json naming one blob per image.

Images are stored as blobs first and the manifest last, so a failure part-way leaves no
visible dataset (only unreferenced blobs, which garbage collection removes). Image
validation (decoding, bombs, sizes) is the training service's job before it calls here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from pathlib import Path

from services.common.errors import InvalidInput, NotFound
from services.registry.blobs import Blobs
from services.registry.documents import checked_page_size, decode_token, encode_token, read_doc
from services.registry.keys import Keys
from services.registry.manifests import DatasetImageRecord, DatasetManifest
from services.registry.names import validate_name, validate_tenant
from services.registry.store import ObjectNotFound, ObjectStore

# (filename, caption, bytes, width, height)
DatasetImageInput = tuple[str, str, bytes, int, int]
_EXT = re.compile(r"^\.[a-z0-9]{1,8}$")


def image_file_name(record: DatasetImageRecord) -> str:
    """Local name of a fetched image: index-ordered, extension kept when it is plain."""
    ext = Path(record.filename).suffix.lower()
    return f"{record.index:04d}{ext if _EXT.fullmatch(ext) else ''}"


class Datasets:
    """Create, read, list and fetch datasets."""

    def __init__(self, store: ObjectStore, keys: Keys, blobs: Blobs) -> None:
        self._store = store
        self._keys = keys
        self._blobs = blobs

    def put(self, tenant: str, name: str, images: Sequence[DatasetImageInput]) -> DatasetManifest:
        """Store images (filename, caption, bytes, width, height) as blobs, then the manifest."""
        validate_tenant(tenant)
        validate_name(name, "name")
        if not images:
            raise InvalidInput("images", "a dataset needs at least one image")
        records = [self._store_image(i, image) for i, image in enumerate(images)]
        manifest = DatasetManifest(
            tenant=tenant,
            id=f"ds-{uuid.uuid4().hex[:20]}",
            name=name,
            images=records,
            total_bytes=sum(r.size for r in records),
        )
        self._store.put_bytes(self._keys.dataset(tenant, manifest.id), manifest.to_json_bytes(), if_none_match=True)
        return manifest

    def _store_image(self, index: int, image: DatasetImageInput) -> DatasetImageRecord:
        filename, caption, data, width, height = image
        if not data:
            raise InvalidInput(f"images[{index}]", "image is empty")
        blob = self._blobs.put_bytes(data)
        return DatasetImageRecord(
            index=index,
            filename=Path(filename).name if filename else f"{index:04d}",
            sha256=blob.sha256,
            size=blob.size,
            width=width,
            height=height,
            caption=caption,
        )

    def get(self, tenant: str, dataset_id: str) -> DatasetManifest:
        """The tenant's dataset by id; NotFound otherwise (also for another tenant's id)."""
        validate_tenant(tenant)
        validate_name(dataset_id, "dataset_id")
        try:
            manifest, _, _ = read_doc(self._store, self._keys.dataset(tenant, dataset_id), DatasetManifest)
        except ObjectNotFound:
            raise NotFound("dataset", dataset_id) from None
        return manifest

    def list_page(
        self, tenant: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[DatasetManifest], str]:
        """One page of the tenant's datasets and the next page token ("" at end)."""
        validate_tenant(tenant)
        size = checked_page_size(page_size)
        after = decode_token(page_token, "datasets")
        prefix = self._keys.datasets_prefix(tenant)
        keys = self._store.list_keys(prefix, start_after=self._keys.dataset(tenant, after) if after else "")
        page: list[DatasetManifest] = []
        for key in keys:
            try:
                manifest, _, _ = read_doc(self._store, key, DatasetManifest)
            except ObjectNotFound:
                continue
            page.append(manifest)
            if len(page) == size:
                more = next(keys, None) is not None
                return page, encode_token("datasets", manifest.id) if more else ""
        return page, ""

    def fetch_images(self, manifest: DatasetManifest, dest_dir: Path) -> list[Path]:
        """Download every image (verified) in index order."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for record in sorted(manifest.images, key=lambda r: r.index):
            dest = dest_dir / image_file_name(record)
            self._blobs.download(record.sha256, dest)
            out.append(dest)
        return out
