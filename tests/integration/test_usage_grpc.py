"""Accounting through the public surface: a real `start_runtime("all")` with auth on (tenants acme,
beta and the admin ops), one training job and some Generate calls by acme, then GetUsage via the
SDK, raw gRPC and the CLI: acme sees its own non-zero training and generation seconds, beta
sees none, windows before the work see none, only the admin may ask for every tenant."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from atelier import Client
from atelier.demo_images import concept_images
from atelier.usage import usage_rows
from atelier_api.v1 import training_pb2, usage_pb2, usage_pb2_grpc
from services.registry.registry import Registry
from services.runtime import Runtime, start_runtime
from tests.fixtures.grpc_servers import bearer, loopback_settings
from tests.fixtures.s3 import free_port

pytestmark = pytest.mark.slow
KEYS = "key-acme=acme,key-beta=beta,key-ops=ops"


@dataclass
class Env:
    training: str
    inference: str
    before: float  # a moment before any usage was recorded
    metrics: CollectorRegistry

    def client(self, key: str) -> Client:
        return Client(self.training, inference_target=self.inference, api_key=key, timeout=120)


@pytest.fixture(scope="module")
def env(tiny_random_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("usage")
    settings = loopback_settings(
        auth_enabled=True, api_keys=KEYS, admin_tenants="ops", registry_url=f"file://{tmp / 'registry'}",
        database_url=f"sqlite:///{tmp / 'jobs.db'}", data_dir=tmp / "var", cache_dir=tmp / "cache",
        training_port=free_port(), inference_port=free_port(), worker_poll_seconds=0.2)
    Registry.from_settings(settings).base_models.import_folder("tiny", tiny_random_pipeline_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    before = time.time()
    metrics = CollectorRegistry()
    runtime: Runtime = asyncio.run_coroutine_threadsafe(start_runtime(settings, "all", metrics), loop).result(120)
    try:
        env = Env(f"127.0.0.1:{settings.training_port}", f"127.0.0.1:{settings.inference_port}", before, metrics)
        with env.client("key-acme") as acme:
            dataset = acme.upload_dataset(concept_images(3, seed=2), name="u", captions=["a photo of <u>"] * 3)
            job = acme.train("textual-inversion", base_model="tiny", dataset=dataset.id, name="u-ti",
                             placeholder_token="<u>", initializer_token="circle", instance_prompt="a photo of <u>",
                             max_train_steps=3, resolution=32, seed=0)
            assert job.wait(timeout=300).state == training_pb2.JOB_STATE_SUCCEEDED
            for seed in range(2):
                acme.generate("a photo of <u>", base_model="tiny", adapters=["u-ti"], steps=2, width=32, height=32,
                              seed=seed)
        yield env
    finally:
        asyncio.run_coroutine_threadsafe(runtime.close(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _by_kind(rows: list[tuple[str, str, str, float]]) -> dict[tuple[str, str], float]:
    return {(tenant, kind): seconds for tenant, kind, _device, seconds in rows}


def test_tenant_sees_its_own_training_and_generation_seconds(env: Env) -> None:
    with env.client("key-acme") as acme:
        for via in ("inference", "training"):  # the embedded process: one ledger behind both servers
            response = acme.usage(env.before - 60, time.time() + 60, via=via)
            usage = _by_kind(usage_rows(response))
            assert set(usage) == {("acme", "training"), ("acme", "generation")}, usage
            assert all(seconds > 0 for seconds in usage.values())
            assert all(t.device == "cpu" for t in response.totals)
    with env.client("key-beta") as beta:
        assert list(beta.usage(env.before - 60).totals) == []


def test_embedded_training_seconds_are_counted_once(env: Env) -> None:
    """The in-process worker's seconds come from the job store only, not also from memory."""
    counted = env.metrics.get_sample_value("atelier_usage_seconds_total",
                                           {"tenant": "acme", "kind": "training", "device": "cpu"})
    with env.client("key-acme") as acme:
        usage = _by_kind(usage_rows(acme.usage(env.before - 60, time.time() + 60, via="training")))
    assert counted is not None and usage[("acme", "training")] == pytest.approx(counted, rel=1e-9)


def test_windows_exclude_usage_outside_them(env: Env) -> None:
    minute = int(env.before // 60) * 60  # every record of this module is in this minute or later
    with env.client("key-acme") as acme:
        assert list(acme.usage(minute - 3600, minute).totals) == []
        assert list(acme.usage(time.time() + 120, time.time() + 180).totals) == []
        inside = acme.usage(minute, None)
        assert len(inside.totals) == 2 and inside.start_time.seconds == minute


def test_all_tenants_is_for_admins_and_bad_windows_are_refused(env: Env) -> None:
    with grpc.insecure_channel(env.inference) as channel:
        stub = usage_pb2_grpc.UsageServiceStub(channel)
        with pytest.raises(grpc.RpcError) as denied:
            stub.GetUsage(usage_pb2.GetUsageRequest(all_tenants=True), metadata=bearer("key-acme"), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        everyone = stub.GetUsage(usage_pb2.GetUsageRequest(all_tenants=True), metadata=bearer("key-ops"), timeout=10)
        assert {t.tenant for t in everyone.totals} == {"acme"}
        with pytest.raises(grpc.RpcError) as bad:
            request = usage_pb2.GetUsageRequest()
            request.start_time.FromSeconds(2000)
            request.end_time.FromSeconds(1000)
            stub.GetUsage(request, metadata=bearer("key-acme"), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_usage(env: Env) -> None:
    exe = Path(sys.executable).with_name("atelier")
    result = subprocess.run(
        [str(exe), "--target", env.training, "--inference-target", env.inference, "--api-key", "key-acme", "--json",
         "usage", "--hours", "1"], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    totals = json.loads(result.stdout)["totals"]
    assert {(t["tenant"], t["kind"]) for t in totals} == {("acme", "USAGE_KIND_TRAINING"),
                                                          ("acme", "USAGE_KIND_GENERATION")}
    table = subprocess.run([str(exe), "--target", env.training, "--inference-target", env.inference, "--api-key",
                            "key-acme", "usage"], capture_output=True, text=True, timeout=60, check=False,
                           env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0 and "generation" in table.stdout and "training" in table.stdout, table.stdout
