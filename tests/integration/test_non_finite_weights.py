"""Issue 16 (4a): NaN/inf weights never reach the registry, through the public gRPC surface.

* ImportAdapter refuses an all-NaN LoRA, an all-inf embedding and a LoRA with a single inf value
  with INVALID_ARGUMENT naming the tensor (field `file`); nothing is published, and the other
  tenant's valid import of the same adapter name is unaffected.
* A training run that really diverges (learning rate 1, LoRA scale alpha/rank = 1024, no
  gradient clipping) FAILS with "training diverged: non-finite weights in ..." and publishes
  no version.

Auth on, two tenants; registry on a local directory, SQLite job store, tiny random base model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from atelier.cli.adapters_io import import_messages
from atelier_api.v1 import common_pb2, registry_pb2, registry_pb2_grpc, training_pb2
from services.common.config import Settings
from services.registry.registry import Registry
from services.registry.servicer import registry_bindings
from services.registry.store import open_store
from tests.fixtures.grpc_servers import ServerThread, bearer, loopback_settings
from tests.fixtures.synthetic import LoraFactory, write_textual_inversion
from tests.integration.test_inference_support import details
from tests.integration.test_training_support import (
    TERMINAL,
    TrainingStack,
    concept_images,
    lora_spec,
    rpc_error,
    stack_settings,
    upload_messages,
    wait_for,
)

A, B = bearer("key-a"), bearer("key-b")
KEYS = "key-a=alpha,key-b=beta"
BASE = "tiny"


def _poisoned(source: Path, dest: Path, poison: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of a safetensors file (header metadata kept) with `poison` applied to each tensor."""
    with safe_open(str(source), framework="pt") as f:
        tensors = {name: poison(name, f.get_tensor(name)) for name in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata=metadata)
    return dest


@pytest.fixture
def registry_server(local_settings: Settings, tiny_random_pipeline_dir: Path, tmp_path: Path,
                    grpc_server: Callable[..., ServerThread]) -> Iterator[registry_pb2_grpc.RegistryServiceStub]:
    registry = Registry(open_store(local_settings))
    registry.base_models.import_folder(BASE, tiny_random_pipeline_dir)
    running = grpc_server(loopback_settings(auth_enabled=True, api_keys=KEYS),
                          lambda: registry_bindings(registry, work_dir=tmp_path / "work"))
    yield registry_pb2_grpc.RegistryServiceStub(running.channel())


def _import(stub: registry_pb2_grpc.RegistryServiceStub, path: Path, name: str,
            who: tuple[tuple[str, str]]) -> common_pb2.AdapterVersion:
    header = registry_pb2.ImportAdapterHeader(name=name, base_model=BASE, filename=path.name)
    return stub.ImportAdapter(import_messages(path, header), metadata=who, timeout=60).version


def test_import_refuses_non_finite_tensors_naming_them(registry_server: registry_pb2_grpc.RegistryServiceStub,
                                                       tiny_random_pipeline_dir: Path, tmp_path: Path) -> None:
    lora = LoraFactory(tiny_random_pipeline_dir).write(tmp_path / "good", seed=3)
    with safe_open(str(lora), framework="pt") as f:
        first, last = next(iter(f.keys())), sorted(f.keys())[-1]
    dim = json.loads((tiny_random_pipeline_dir / "text_encoder" / "config.json").read_text())["hidden_size"]
    ti = write_textual_inversion(tmp_path / "ti", "<tok>", dim=dim, seed=1)

    def one_inf(name: str, t: torch.Tensor) -> torch.Tensor:
        if name == last:
            t = t.clone()
            t.view(-1)[0] = float("inf")
        return t

    cases = [
        (_poisoned(lora, tmp_path / "nan" / lora.name, lambda _n, t: torch.full_like(t, float("nan"))), first),
        (_poisoned(ti, tmp_path / "inf" / ti.name, lambda _n, t: torch.full_like(t, float("-inf"))), "<tok>"),
        (_poisoned(lora, tmp_path / "one-inf" / lora.name, one_inf), last),
    ]
    for path, tensor in cases:
        err = rpc_error(lambda p=path: _import(registry_server, p, "style", A))  # type: ignore[misc]
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert repr(tensor) in (err.details() or "") and "non-finite" in (err.details() or ""), err.details()
        assert details(err)["fields"] == ["file"]
    listed = registry_server.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=A, timeout=10).adapters
    assert not listed  # nothing was published
    assert _import(registry_server, lora, "style", B).version == 1  # the other tenant, a finite file: fine
    assert _import(registry_server, lora, "style", A).version == 1


def test_diverged_training_fails_the_job_and_publishes_nothing(tmp_path: Path, local_settings: Settings,
                                                               sqlite_url: str, tiny_random_pipeline_dir: Path) -> None:
    settings = stack_settings(tmp_path, local_settings, sqlite_url, auth_enabled=True, api_keys=KEYS)
    with TrainingStack(settings, workers=1) as stack:
        stack.registry.base_models.import_folder(BASE, tiny_random_pipeline_dir)
        dataset = stack.training.UploadDataset(iter(upload_messages(concept_images(), "photos", 4096)),
                                               metadata=A, timeout=30).dataset.id
        spec = lora_spec(dataset, output="diverged", steps=8, learning_rate=1.0, max_grad_norm=0.0,
                         checkpointing_steps=100)
        spec.lora.rank, spec.lora.alpha = 1, 1024.0
        job = stack.training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(spec=spec), metadata=A,
                                               timeout=30).job
        done = wait_for(lambda: stack.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=job.id),
                                                              metadata=A, timeout=10).job,
                        lambda j: j.state in TERMINAL, timeout=180)
        assert done.state == training_pb2.JOB_STATE_FAILED, done
        assert "training diverged: non-finite weights in" in done.error, done.error
        assert done.attempts == 1  # permanent: not retried
        for who in (A, B):
            assert not stack.registry_stub.ListAdapters(registry_pb2.ListAdaptersRequest(), metadata=who,
                                                        timeout=10).adapters
