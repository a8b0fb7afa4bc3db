"""Issue 16 (4b, 4c, 4d): how an S3 outage looks to callers, through the public gRPC surface.

* UNAVAILABLE says "the registry is temporarily unavailable" with RetryInfo; the endpoint,
  bucket and key layout stay in the server log.
* A hung S3 (a loopback TCP server that accepts and never answers) gives UNAVAILABLE before the
  caller's deadline, not DEADLINE_EXCEEDED, on the registry API and on a cold Generate.
* CreateTrainingJob needs the registry (dataset and base model are checked at creation), so it
  answers UNAVAILABLE + RetryInfo during an outage and creates nothing; reading jobs keeps working.

Auth is on with two tenants; the other tenant's calls fail the same way and see nothing more.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from atelier_api.v1 import inference_pb2, registry_pb2, training_pb2
from services.registry.store import REGISTRY_UNAVAILABLE
from tests.fixtures.grpc_servers import bearer
from tests.fixtures.s3 import LOOPBACK, MotoServer, free_port, make_s3_settings
from tests.integration.test_inference_support import details, engine_settings, spec, start_env
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    rpc_error,
    stack_settings,
    upload_messages,
)

A, B = bearer("key-a"), bearer("key-b")
KEYS = "key-a=alpha,key-b=beta"
BUCKET = "secret-bucket-name"


class HungS3:
    """Accepts TCP connections and never answers: S3 that hangs mid-request."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.endpoint = f"http://{LOOPBACK}:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for conn in self.held:
            conn.close()
        self.sock.close()


@pytest.fixture
def hung_s3() -> Iterator[HungS3]:
    server = HungS3()
    yield server
    server.close()


def _registry_stack(tmp_path: Path, endpoint: str, database: str) -> TrainingStack:
    registry = make_s3_settings(endpoint, BUCKET)
    return TrainingStack(stack_settings(tmp_path, registry, database, auth_enabled=True, api_keys=KEYS,
                                        s3_connect_timeout_seconds=1.0, s3_read_timeout_seconds=30.0,
                                        s3_max_attempts=1), workers=0)


def _assert_generic_unavailable(err: grpc.RpcError, endpoint: str) -> None:
    assert err.code() == grpc.StatusCode.UNAVAILABLE, err
    message = err.details() or ""
    assert message == REGISTRY_UNAVAILABLE
    for secret in (endpoint, endpoint.rsplit(":", 1)[-1], BUCKET, "adapters/", "blobs/", "sha256"):
        assert secret not in message
    assert details(err)["retry_after"] is not None and details(err)["retry_after"] > 0


def test_unavailable_is_generic_with_retry_info_and_logged_in_full(
        tmp_path: Path, sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    endpoint = f"http://{LOOPBACK}:{free_port()}"  # nothing listens: connection refused
    with _registry_stack(tmp_path, endpoint, sqlite_url) as stack, caplog.at_level(logging.INFO):
        for who in (A, B):
            err = rpc_error(lambda w=who: stack.registry_stub.ListAdapters(  # type: ignore[misc]
                registry_pb2.ListAdaptersRequest(), metadata=w, timeout=20))
            _assert_generic_unavailable(err, endpoint)
    logged = [getattr(r, "detail", "") for r in caplog.records if r.getMessage() == "rpc failed"]
    assert any(endpoint in d and BUCKET in d for d in logged), logged  # operators still see where


def test_hung_s3_gives_unavailable_within_the_deadline(tmp_path: Path, sqlite_url: str, hung_s3: HungS3) -> None:
    with _registry_stack(tmp_path, hung_s3.endpoint, sqlite_url) as stack:
        for who in (A, B):
            started = time.monotonic()
            err = rpc_error(lambda w=who: stack.registry_stub.ListAdapters(  # type: ignore[misc]
                registry_pb2.ListAdaptersRequest(), metadata=w, timeout=2.0))
            elapsed = time.monotonic() - started
            _assert_generic_unavailable(err, hung_s3.endpoint)  # not DEADLINE_EXCEEDED
            assert 1.0 < elapsed < 2.0, elapsed  # waited for S3 nearly the whole budget, then told the caller


def test_hung_s3_cold_generate_is_unavailable_within_the_deadline(
        tmp_path: Path, tiny_random_pipeline_dir: Path, hung_s3: HungS3) -> None:
    settings = engine_settings(hung_s3.endpoint, BUCKET, tmp_path, tiny_random_pipeline_dir, auth_enabled=True,
                               api_keys=KEYS, s3_read_timeout_seconds=30.0)
    env = start_env(settings, tiny_random_pipeline_dir, metadata=A)
    try:
        env.generate(steps=1, timeout=60)  # the base model is local: no S3 needed
        started = time.monotonic()
        err = rpc_error(lambda: env.stub.Generate(inference_pb2.GenerateRequest(spec=spec(adapters=[("cold", 1.0)])),
                                                  metadata=B, timeout=2.0))
        _assert_generic_unavailable(err, hung_s3.endpoint)
        assert time.monotonic() - started < 2.0
    finally:
        env.close()


def test_create_training_job_during_an_outage_is_unavailable_and_reads_keep_working(
        tmp_path: Path, sqlite_url: str, moto_server: MotoServer, tiny_random_pipeline_dir: Path) -> None:
    moto_server.ensure_running()
    bucket = moto_server.create_bucket()
    settings = stack_settings(tmp_path, make_s3_settings(moto_server.endpoint, bucket), sqlite_url,
                              auth_enabled=True, api_keys=KEYS, s3_connect_timeout_seconds=1.0,
                              s3_read_timeout_seconds=5.0, s3_max_attempts=1)
    with TrainingStack(settings, workers=0) as stack:
        stack.registry.base_models.import_folder("tiny", tiny_random_pipeline_dir)
        dataset = stack.training.UploadDataset(iter(upload_messages(concept_images(), "photos", 4096)),
                                               metadata=A, timeout=30).dataset.id
        before = stack.training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(
            spec=lora_spec(dataset, output="first")), metadata=A, timeout=30).job
        moto_server.stop()
        try:
            err = rpc_error(lambda: stack.training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(
                request_id="retry-me", spec=lora_spec(dataset, output="second")), metadata=A, timeout=20))
            _assert_generic_unavailable(err, moto_server.endpoint)
            jobs = stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=A, timeout=10).jobs
            assert [j.id for j in jobs] == [before.id]  # nothing was created; listing works without S3
            got = stack.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=before.id), metadata=A,
                                                timeout=10).job
            assert got.state == training_pb2.JOB_STATE_QUEUED
            assert not stack.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), metadata=B,
                                                       timeout=10).jobs
        finally:
            moto_server.start()
