"""Shared helpers for the training integration tests (no tests here).

`TrainingStack` runs the real thing: TrainingService + RegistryService on a loopback gRPC
server (tests.fixtures.grpc_servers.ServerThread) over `TrainingRuntime`, a real job store
(SQLite file or a fresh PostgreSQL database) and a real registry (directory or moto S3).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from prometheus_client import CollectorRegistry

from atelier_api.v1 import common_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc
from services.common.config import Settings
from services.registry.registry import Registry
from services.training.jobstore import JobStore
from services.training.runtime import TrainingRuntime
from tests.fixtures.grpc_servers import ServerThread, loopback_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
LORA = common_pb2.ADAPTER_KIND_LORA
TI = common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION
DREAMBOOTH = common_pb2.ADAPTER_KIND_DREAMBOOTH
TERMINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}


def stack_settings(tmp_path: Path, registry_settings: Settings, database_url: str, **overrides: Any) -> Settings:
    """Loopback server settings over the given registry and database, with test-sized limits."""
    values: dict[str, Any] = {
        "registry_url": registry_settings.registry_url,
        "s3_endpoint_url": registry_settings.s3_endpoint_url,
        "s3_access_key_id": registry_settings.s3_access_key_id,
        "s3_secret_access_key": registry_settings.s3_secret_access_key,
        "s3_region": registry_settings.s3_region,
        "database_url": database_url,
        "data_dir": tmp_path / "var",
        "worker_poll_seconds": 0.1,
        "lease_seconds": 5.0,
        "heartbeat_seconds": 0.5,
        "max_dataset_images": 6,
        "max_dataset_bytes": 400_000,
        "max_image_pixels": 4_000_000,
        "training_device": "cpu",
    }
    values.update(overrides)
    return loopback_settings(**values)


class TrainingStack:
    """A running training server with stubs, its store and registry."""

    def __init__(self, settings: Settings, workers: int, metrics: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry: Registry = Registry.from_settings(settings)
        self.store = JobStore.open(settings)
        self.metrics = metrics
        self.embedded = TrainingRuntime(settings, registry=self.registry, store=self.store, workers=workers,
                                         metrics_registry=metrics)
        self.server = ServerThread(settings, self.embedded.bindings)

    def __enter__(self) -> TrainingStack:
        self.server.start()
        channel = self.server.channel()
        self.training = training_pb2_grpc.TrainingServiceStub(channel)
        self.registry_stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self.embedded.start_workers()
        return self

    def __exit__(self, *_: object) -> None:
        self.embedded.stop(timeout=30)
        self.server.stop()
        self.store.close()

    # --- calls ------------------------------------------------------------------------
    def upload(self, images: list[tuple[str, bytes, str]], name: str = "photos", chunk: int = 4096) -> Any:
        return self.training.UploadDataset(iter(upload_messages(images, name, chunk)), timeout=30)

    def create(self, spec: training_pb2.TrainingJobSpec, request_id: str = "") -> Any:
        return self.training.CreateTrainingJob(
            training_pb2.CreateTrainingJobRequest(request_id=request_id, spec=spec), timeout=30
        )

    def watch(self, job_id: str, timeout: float = 120) -> list[training_pb2.WatchTrainingJobResponse]:
        return list(self.training.WatchTrainingJob(training_pb2.WatchTrainingJobRequest(id=job_id), timeout=timeout))

    def get(self, job_id: str) -> training_pb2.TrainingJob:
        return self.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=job_id), timeout=10).job

    def wait(self, job_id: str, predicate: Callable[[training_pb2.TrainingJob], bool], timeout: float = 120) -> Any:
        return wait_for(lambda: self.get(job_id), predicate, timeout)


def wait_for(fetch: Callable[[], Any], predicate: Callable[[Any], bool], timeout: float, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value}")
        time.sleep(every)


def upload_messages(
    images: list[tuple[str, bytes, str]], name: str, chunk: int
) -> Iterator[training_pb2.UploadDatasetRequest]:
    """Header, then each image split into `chunk`-byte messages (filename/caption on the first)."""
    yield training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name=name))
    for index, (filename, data, caption) in enumerate(images):
        for offset in range(0, max(len(data), 1), chunk):
            first = offset == 0
            yield training_pb2.UploadDatasetRequest(
                image=training_pb2.DatasetImageChunk(
                    index=index,
                    filename=filename if first else "",
                    caption=caption if first else "",
                    data=data[offset : offset + chunk],
                )
            )


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 40, 40),
                pattern: int = 0) -> bytes:
    """A small image; `pattern` > 0 draws stripes so images differ."""
    img = Image.new("RGB", size, colour)
    if pattern:
        for x in range(0, size[0], 8):
            for y in range(size[1]):
                if (x // 8 + pattern) % 2 == 0:
                    for dx in range(4):
                        if x + dx < size[0]:
                            img.putpixel((x + dx, y), (255 - colour[0], 255 - colour[1], 255 - colour[2]))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def noise_image_bytes(size: int = 200, seed: int = 0) -> bytes:
    """An incompressible PNG of about size*size*3 bytes."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(seed).randbytes(size * size * 3)).save(buf, format="PNG")
    return buf.getvalue()


def concept_images(count: int = 4) -> list[tuple[str, bytes, str]]:
    return [(f"dog{i}.png", image_bytes(pattern=i + 1), "") for i in range(count)]


def lora_spec(dataset_id: str, output: str = "dog", base: str = "tiny", steps: int = 6, **hyper: Any) -> Any:
    values: dict[str, Any] = {"max_train_steps": steps, "resolution": 32, "train_batch_size": 1,
                              "checkpointing_steps": 2, "validation_steps": 1000, "seed": 7}
    values.update(hyper)
    return training_pb2.TrainingJobSpec(
        method=LORA, base_model=base, dataset_id=dataset_id, output_name=output,
        instance_prompt="a photo of sks dog", lora=training_pb2.LoraOptions(rank=2),
        hyperparameters=training_pb2.Hyperparameters(**values),
    )


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded; an error was expected")


def violation_fields(err: grpc.RpcError) -> list[str]:
    """Fields of the google.rpc.BadRequest detail of an error."""
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"no rich status on {err}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    raise AssertionError(f"no BadRequest detail on {err}")


@contextmanager
def worker_process(settings: Settings, worker_id: str, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`atelier worker` as a real subprocess, configured through ATELIER_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    for key, value in settings.model_dump().items():
        if value is not None:
            env[f"ATELIER_{key.upper()}"] = str(value)
    health_port = settings.worker_health_port if "worker_health_port" in settings.model_fields_set else 0
    env.update({"ATELIER_METRICS_PORT": "0", "ATELIER_WORKER_HEALTH_PORT": str(health_port),
                "ATELIER_LOG_JSON": "false", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'clients' / 'python'}"})
    exe = Path(sys.executable).with_name("atelier")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(exe), "worker", "--id", worker_id], env=env, cwd=REPO_ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
