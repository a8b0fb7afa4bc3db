"""Accounting in cluster mode: a real `atelier worker` subprocess trains a job on PostgreSQL + S3
and records its device seconds in the job store; the training API (`start_runtime("training-api")`,
another process's server with no worker of its own, auth on) answers GetUsage from there: acme
sees its training seconds in the window, beta none, windows outside the work none. The job is
submitted through the CLI with `--optimizer/--lr-scheduler`, which must reach the job's spec."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from atelier import Client
from atelier.cli.main import app
from atelier.demo_images import concept_images
from atelier.usage import usage_rows
from atelier_api.v1 import training_pb2
from services.registry.registry import Registry
from services.runtime import Runtime, start_runtime
from tests.fixtures.postgres import _server_url
from tests.fixtures.s3 import MotoServer, free_port, make_s3_settings
from tests.integration.test_training_support import stack_settings, worker_process

pytestmark = pytest.mark.slow
KEYS = "key-acme=acme,key-beta=beta,key-ops=ops"


@dataclass
class Cluster:
    training: str
    before: float  # a moment before the worker recorded anything
    after: float  # a moment after the job succeeded
    job: training_pb2.TrainingJob

    def client(self, key: str) -> Client:
        return Client(self.training, api_key=key, timeout=60)


def _train_via_cli(target: str, dataset: str) -> str:
    result = CliRunner().invoke(app, [
        "--target", target, "--api-key", "key-acme", "--json", "train", "lora", "--base", "tiny", "--dataset",
        dataset, "--name", "usage-lora", "--prompt", "a photo of sks dog", "--steps", "3", "--resolution", "32",
        "--seed", "0", "--optimizer", "AdamW", "--lr-scheduler", "cosine", "--detach"])
    assert result.exit_code == 0, result.output
    return str(json.loads(result.stdout)["id"])


@pytest.fixture(scope="module")
def database(postgres_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for the module (the `postgres_url` fixture is per test)."""
    name = f"atelier_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _server_url(name)
    finally:
        with psycopg.connect(postgres_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, database: str,
            tiny_random_pipeline_dir: Path) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("usage-cluster")
    moto_server.ensure_running()
    s3_settings = make_s3_settings(moto_server.endpoint, moto_server.create_bucket())
    settings = stack_settings(tmp, s3_settings, database, auth_enabled=True, api_keys=KEYS, admin_tenants="ops",
                              training_port=free_port(), usage_flush_seconds=3600.0)
    Registry.from_settings(settings).base_models.import_folder("tiny", tiny_random_pipeline_dir)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runtime: Runtime = asyncio.run_coroutine_threadsafe(start_runtime(settings, "training-api"), loop).result(120)
    target = f"127.0.0.1:{settings.training_port}"
    try:
        with Client(target, api_key="key-acme", timeout=60) as acme, \
                worker_process(settings, "usage-worker", tmp / "worker.log"):
            before = time.time()
            dataset = acme.upload_dataset(concept_images(2, seed=3), name="u")
            job = acme.jobs.get(_train_via_cli(target, dataset.id)).wait(timeout=300)
            assert job.state == training_pb2.JOB_STATE_SUCCEEDED, (job.error, (tmp / "worker.log").read_text()[-3000:])
        yield Cluster(target, before, time.time(), job)
    finally:
        asyncio.run_coroutine_threadsafe(runtime.close(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _training(rows: list[tuple[str, str, str, float]]) -> dict[str, float]:
    return {tenant: seconds for tenant, kind, _device, seconds in rows if kind == "training"}


def test_training_api_reports_the_separate_workers_seconds(cluster: Cluster) -> None:
    started, finished = cluster.job.started_at.ToSeconds(), cluster.job.finished_at.ToSeconds()
    with cluster.client("key-acme") as acme:
        response = acme.usage(cluster.before - 60, cluster.after + 60)
    usage = _training(usage_rows(response))
    assert set(usage) == {"acme"} and [t.device for t in response.totals] == ["cpu"]
    # Step wall time, set-up included: positive and within the attempt's own span.
    assert 0 < usage["acme"] <= (finished - started) + 1.0, (usage, started, finished)
    with cluster.client("key-ops") as ops:
        everyone = ops.usage(cluster.before - 60, cluster.after + 60, all_tenants=True)
    assert {t.tenant for t in everyone.totals} == {"acme"}


def test_another_tenant_and_windows_outside_the_work_see_none(cluster: Cluster) -> None:
    minute = int(cluster.before // 60) * 60
    with cluster.client("key-beta") as beta:
        assert list(beta.usage(cluster.before - 60, cluster.after + 60).totals) == []
    with cluster.client("key-acme") as acme:
        assert list(acme.usage(minute - 3600, minute).totals) == []
        assert list(acme.usage(cluster.after + 120, cluster.after + 180).totals) == []
        unbounded = acme.usage()
        assert len(unbounded.totals) == 1 and unbounded.start_time.seconds >= minute


def test_cli_optimizer_and_schedule_reach_the_job(cluster: Cluster) -> None:
    hyper = cluster.job.spec.hyperparameters
    assert hyper.optimizer == training_pb2.OPTIMIZER_KIND_ADAMW
    assert hyper.lr_scheduler_kind == training_pb2.LR_SCHEDULER_KIND_COSINE
