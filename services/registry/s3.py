"""S3-compatible object store (AWS S3, MinIO, Ceph RGW, R2, moto) over boto3.

Conditional writes use the S3 headers directly: `IfNoneMatch="*"` on PutObject and
CompleteMultipartUpload creates only when the key is absent, `IfMatch=<etag>` replaces
only an unchanged object. Large files go up in parts of `s3_multipart_part_bytes`, read
one part at a time, so memory stays bounded whatever the file size. Connection failures
and 5xx answers surface as StoreUnavailable (gRPC UNAVAILABLE with a retry hint and a
generic message; endpoint, bucket and key go to the server log only).

Inside an RPC with a deadline, each S3 call waits at most the time left minus a margin
(`services.common.deadlines`): botocore's timeouts are per client, so the call runs on a helper
thread and a hung S3 becomes StoreUnavailable while the caller can still hear about it.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from services.common.config import Settings
from services.common.deadlines import remaining_seconds
from services.registry.store import (
    STREAM_CHUNK_BYTES,
    ObjectInfo,
    ObjectNotFound,
    PreconditionFailed,
    StoreUnavailable,
    validate_key,
    write_atomically,
)

T = TypeVar("T")
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum for every part but the last
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
DEADLINE_MARGIN_SECONDS = 0.5  # kept back from the caller's deadline so UNAVAILABLE reaches it
MAX_POOL_CONNECTIONS = 32


def deadline_budget(left: float) -> float:
    """How long one S3 call may wait with `left` seconds before the caller's deadline."""
    return left - min(DEADLINE_MARGIN_SECONDS, 0.25 * left)


class S3Store:
    """ObjectStore over one bucket, with every key under an optional prefix."""

    def __init__(self, settings: Settings, *, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._threshold = settings.s3_multipart_threshold_bytes
        self._part_bytes = max(MIN_PART_BYTES, settings.s3_multipart_part_bytes)
        config = Config(
            connect_timeout=settings.s3_connect_timeout_seconds,
            read_timeout=settings.s3_read_timeout_seconds,
            retries={"max_attempts": settings.s3_max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
            max_pool_connections=MAX_POOL_CONNECTIONS,
        )
        self._endpoint = settings.s3_endpoint_url or "aws"
        # Runs calls that must give up at the caller's deadline; a hung call keeps its thread
        # until botocore's own timeout ends it.
        self._bounded = ThreadPoolExecutor(MAX_POOL_CONNECTIONS, thread_name_prefix="atelier-s3")
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=config,
        )

    def __repr__(self) -> str:
        return f"S3Store(s3://{self.bucket}/{self.prefix})"

    # --- helpers ------------------------------------------------------------------
    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str) -> str:
        """Endpoint, bucket and key of a call: for the server log (StoreUnavailable.detail)."""
        full = f"{self.prefix}/{key}" if self.prefix else key
        return f"S3 {self._endpoint} bucket {self.bucket!r} key {full!r}"

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        """Run one S3 call within the caller's deadline, translating failures into store errors."""
        try:
            return self._within_deadline(key, fn)
        except ClientError as exc:
            raise _translate(key, exc, self._where(key)) from exc
        except BotoCoreError as exc:
            raise StoreUnavailable(f"{self._where(key)}: unreachable: {exc}", 2.0) from exc

    def _within_deadline(self, key: str, fn: Callable[[], T]) -> T:
        left = remaining_seconds()
        if left is None:
            return fn()
        budget = deadline_budget(left)
        if budget <= 0:
            raise StoreUnavailable(f"{self._where(key)}: no time left in the caller's deadline", 1.0)
        future = self._bounded.submit(contextvars.copy_context().run, fn)
        try:
            return future.result(timeout=budget)
        except FutureTimeout:
            future.cancel()
            raise StoreUnavailable(
                f"{self._where(key)}: no answer within the caller's deadline ({budget:.2f} s)", 2.0) from None

    # --- ObjectStore --------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            resp = self._call(key, lambda: self._client.put_object(**kwargs))
        except ObjectNotFound:
            raise PreconditionFailed(key, "object to replace is gone") from None
        return str(resp["ETag"])

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        def get() -> tuple[bytes, str]:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return resp["Body"].read(), str(resp["ETag"])

        return self._call(key, get)

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        size = path.stat().st_size
        if size <= self._threshold:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
            if if_none_match:
                kwargs["IfNoneMatch"] = "*"
            with open(path, "rb") as f:
                resp = self._call(key, lambda: self._client.put_object(Body=f, **kwargs))
            return str(resp["ETag"])
        return self._multipart(key, path, if_none_match)

    def _multipart(self, key: str, path: Path, if_none_match: bool) -> str:
        full = self._key(key)
        upload = self._call(key, lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full))
        upload_id = upload["UploadId"]
        try:
            parts = self._upload_parts(key, full, upload_id, path)
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": full,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if if_none_match:
                kwargs["IfNoneMatch"] = "*"
            resp = self._call(key, lambda: self._client.complete_multipart_upload(**kwargs))
        except BaseException:
            self._abort(full, upload_id)
            raise
        return str(resp["ETag"])

    def _upload_parts(self, key: str, full: str, upload_id: str, path: Path) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        with open(path, "rb") as f:
            number = 1
            while chunk := f.read(self._part_bytes):
                resp = self._call(
                    key,
                    lambda c=chunk, n=number: self._client.upload_part(  # type: ignore[misc]
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=c
                    ),
                )
                parts.append({"PartNumber": number, "ETag": resp["ETag"]})
                number += 1
        return parts

    def _abort(self, full: str, upload_id: str) -> None:
        # On failure, the bucket's lifecycle rule for incomplete uploads cleans up.
        with contextlib.suppress(ClientError, BotoCoreError):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)

    def download_file(self, key: str, dest_path: Path) -> None:
        write_atomically(dest_path, self.open_stream(key))

    def open_stream(self, key: str) -> Iterator[bytes]:
        resp = self._call(key, lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key)))
        return self._chunks(key, resp["Body"])

    def _chunks(self, key: str, body: Any) -> Iterator[bytes]:
        chunks = body.iter_chunks(STREAM_CHUNK_BYTES)
        try:
            while (chunk := self._within_deadline(key, lambda: next(chunks, None))) is not None:
                yield chunk
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"{self._where(key)}: read failed: {exc}", 2.0) from exc
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def list_keys(self, prefix: str, *, start_after: str = "") -> Iterator[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        if start_after:
            kwargs["StartAfter"] = f"{self.prefix}/{start_after}" if self.prefix else start_after
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(prefix, lambda: iter(paginator.paginate(**kwargs)))
        while True:
            page = self._call(prefix, lambda: next(pages, None))
            if page is None:
                return
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def list_objects(self, prefix: str) -> Iterator[ObjectInfo]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(prefix, lambda: iter(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)))
        while (page := self._call(prefix, lambda: next(pages, None))) is not None:
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"].timestamp())

    def stat(self, key: str) -> ObjectInfo:
        resp = self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)))
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def touch(self, key: str) -> None:
        """Copy the object onto itself with new metadata: S3's only way to renew LastModified
        (a server-side copy; objects over 5 GiB would need a multipart copy)."""
        full = self._key(key)
        self._call(key, lambda: self._client.copy_object(
            Bucket=self.bucket, Key=full, CopySource={"Bucket": self.bucket, "Key": full},
            MetadataDirective="REPLACE", Metadata={"atelier-touched": str(int(time.time()))},
        ))


def _translate(key: str, exc: ClientError, where: str) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _NOT_FOUND:
        return ObjectNotFound(key)
    if code in _PRECONDITION:
        return PreconditionFailed(key, code)
    if code == "NoSuchBucket":
        return StoreUnavailable(f"{where}: bucket is missing: {error.get('Message', code)}", 5.0)
    if status >= 500 or code in {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}:
        return StoreUnavailable(f"{where}: error {code}: {error.get('Message', '')}", 2.0)
    return exc
