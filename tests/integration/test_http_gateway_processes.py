"""The HTTP gateway in other process shapes: a `training-api` process (no worker, so a job stays
QUEUED and its watch is quiet: keepalive comments, hang-up cancels the idle RPC; a service the
role does not host is 501; a taken http_port fails start-up cleanly) and TLS gRPC servers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry

from services.common.usage import UsageLedger
from services.common.usage_service import usage_bindings
from services.gateway.server import RunningGateway, start_gateway
from services.registry.registry import Registry
from services.runtime import start_runtime
from tests.fixtures.grpc_servers import ServerThread, loopback_settings, make_self_signed_cert
from tests.fixtures.s3 import free_port
from tests.integration.http_gateway_support import Env, assert_status, in_flight, running, upload_form

pytestmark = pytest.mark.slow


def test_gateway_dials_tls_servers_with_the_configured_certificate(tmp_path: Path) -> None:
    """With TLS on, the loopback channel trusts tls_cert_file (the same plumbing as any gRPC client)."""
    cert, key = make_self_signed_cert(tmp_path)
    settings = loopback_settings(tls_cert_file=cert, tls_key_file=key)
    ledger = UsageLedger.from_settings(settings, CollectorRegistry())
    with ServerThread(settings, lambda: usage_bindings(ledger)) as server:
        gateway = server.run(start_gateway(settings, {"atelier.v1.UsageService": server.target}, 0, None))
        try:
            response = requests.get(f"http://127.0.0.1:{gateway.port}/v1/usage", timeout=60)
            assert response.status_code == 200, response.text
            assert response.json()["totals"] == [] and response.headers["X-Request-Id"]
        finally:
            server.run(gateway.close())


@pytest.fixture(scope="module")
def api_only(tiny_random_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """`start_runtime("training-api")` (no worker, so a job stays QUEUED), SSE keepalive 0.2 s."""
    tmp = tmp_path_factory.mktemp("http-api-only")
    settings = loopback_settings(
        registry_url=f"file://{tmp / 'registry'}", database_url=f"sqlite:///{tmp / 'jobs.db'}", data_dir=tmp / "var",
        training_port=free_port(), http_port=free_port(), http_sse_keepalive_seconds=0.2)
    Registry.from_settings(settings).base_models.import_folder("tiny", tiny_random_pipeline_dir)
    with running(settings, "training-api") as env:
        yield env


def _queued_job(env: Env) -> str:
    dataset = env.send("POST", "/v1/datasets", files=upload_form(3), headers={}).json()["dataset"]
    spec = {"method": "ADAPTER_KIND_LORA", "base_model": "tiny", "dataset_id": dataset["id"], "output_name": "q",
            "instance_prompt": "a photo of sks toy", "hyperparameters": {"max_train_steps": 2, "resolution": 32}}
    created = env.send("POST", "/v1/jobs", {"spec": spec}, headers={})
    assert created.status_code == 200, created.text
    job: dict[str, Any] = created.json()["job"]
    assert job["state"] == "JOB_STATE_QUEUED"
    return str(job["id"])


def _watches_in_flight(env: Env) -> float:
    return in_flight(env, "/atelier.v1.TrainingService/WatchTrainingJob")


def _watches_handled(env: Env) -> float:
    """WatchTrainingJob RPCs finished so far, whatever their status code."""
    total = 0.0
    for metric in env.metrics.collect():
        for sample in metric.samples:
            if (sample.name == "atelier_grpc_server_handled_total"
                    and sample.labels.get("grpc_method") == "/atelier.v1.TrainingService/WatchTrainingJob"):
                total += sample.value
    return total


def test_a_quiet_event_stream_sends_keepalive_comments(api_only: Env) -> None:
    job_id = _queued_job(api_only)
    with api_only.get(f"/v1/jobs/{job_id}:watch", headers={}, stream=True) as watch:
        lines = watch.iter_lines(decode_unicode=True)
        first = next(lines)
        assert first.startswith("data:") and json.loads(first[5:])["job"]["state"] == "JOB_STATE_QUEUED"
        comments = [line for line in (next(lines) for _ in range(6)) if line]
        assert comments == [": keepalive"] * len(comments) and len(comments) >= 2, comments


def test_hanging_up_an_idle_watch_cancels_its_rpc_at_once(api_only: Env) -> None:
    """No message and no keepalive is due for a minute; the hang-up alone ends the RPC."""
    settings = api_only.settings.model_copy(update={"http_sse_keepalive_seconds": 60.0})
    target = f"127.0.0.1:{api_only.settings.training_port}"
    gateway: RunningGateway = asyncio.run_coroutine_threadsafe(
        start_gateway(settings, {"atelier.v1.TrainingService": target}, 0, None), api_only.loop).result(30)
    try:
        job_id = _queued_job(api_only)
        handled = _watches_handled(api_only)
        response = requests.get(f"http://127.0.0.1:{gateway.port}/v1/jobs/{job_id}:watch", stream=True, timeout=60)
        assert next(response.iter_lines()).startswith(b"data:")
        start = time.monotonic()
        response.close()
        # The RPC must be over (no longer in flight, and counted as handled) soon after the hang-up.
        while _watches_in_flight(api_only) > 0 or _watches_handled(api_only) < handled + 1:
            assert time.monotonic() - start < 20, "the watch RPC outlived its HTTP connection"
            time.sleep(0.05)
    finally:
        asyncio.run_coroutine_threadsafe(gateway.close(), api_only.loop).result(30)


def test_a_role_without_a_service_answers_501(api_only: Env) -> None:
    assert_status(api_only.get("/v1/cache", headers={}), 501, 12)  # no InferenceService in training-api
    assert api_only.get("/v1/usage", headers={}).status_code == 200


def test_a_taken_http_port_fails_start_up_and_releases_the_grpc_port(api_only: Env,
                                                                    tmp_path: Path) -> None:
    taken = int(api_only.base.rsplit(":", 1)[1])
    settings = api_only.settings.model_copy(update={
        "http_port": taken, "training_port": free_port(), "database_url": f"sqlite:///{tmp_path / 'jobs.db'}",
        "data_dir": tmp_path / "var"})
    with pytest.raises(OSError):
        asyncio.run_coroutine_threadsafe(start_runtime(settings, "training-api"), api_only.loop).result(120)
    with socket.socket() as sock:  # the training server that had started was stopped again
        sock.bind(("127.0.0.1", settings.training_port))
