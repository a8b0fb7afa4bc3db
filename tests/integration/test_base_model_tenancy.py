"""Shared base models under auth (issue 16, defect 1): only admins change them, versions never move.

Real gRPC with auth on and three keys (tenants A and B, admin "ops"), the registry on moto S3,
the job store on SQLite; TrainingService + RegistryService (no worker) and InferenceService
loading the base model from the registry. Tenant B tries to delete or replace `tiny-sd`;
tenant A's Generate and CreateTrainingJob must not notice. Admin imports of new bytes become
new versions, old versions stay readable as `name@N`, and numbers are never reused.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from atelier.transport import base_model_upload
from atelier_api.v1 import common_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, training_pb2
from services.common.config import Settings
from services.inference.engine import InferenceEngine
from services.inference.servicer import inference_bindings
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.registry import Registry
from tests.fixtures.grpc_servers import ServerThread, bearer
from tests.fixtures.synthetic import LoraFactory
from tests.integration.test_inference_support import details, rpc_error
from tests.integration.test_training_support import (
    TrainingStack,
    concept_images,
    lora_spec,
    stack_settings,
    upload_messages,
)

A, B, ADMIN = bearer("key-a"), bearer("key-b"), bearer("key-ops")
BASE = "tiny-sd"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Env:
    stack: TrainingStack
    inference: inference_pb2_grpc.InferenceServiceStub
    dataset_id: str
    v1: common_pb2.BaseModel

    def import_(self, folder: Path, metadata: Any, name: str = BASE) -> common_pb2.BaseModel:
        reply = self.stack.registry_stub.ImportBaseModel(base_model_upload(name, folder, ""), metadata=metadata,
                                                         timeout=60)
        return reply.base_model

    def get(self, ref: str) -> common_pb2.BaseModel:
        return self.stack.registry_stub.GetBaseModel(registry_pb2.GetBaseModelRequest(name=ref), metadata=A).base_model

    def delete(self, ref: str, metadata: Any) -> None:
        self.stack.registry_stub.DeleteBaseModel(registry_pb2.DeleteBaseModelRequest(name=ref), metadata=metadata)

    def generate(self, base: str = BASE, adapter: str = "") -> inference_pb2.GenerateResponse:
        spec = inference_pb2.GenerationSpec(base_model=base, prompt="a red box", steps=2, width=32, height=32, seed=1)
        if adapter:
            spec.adapters.append(inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name=adapter), weight=1.0))
        return self.inference.Generate(inference_pb2.GenerateRequest(spec=spec), metadata=A, timeout=120)

    def train(self, base: str = BASE) -> training_pb2.TrainingJob:
        request = training_pb2.CreateTrainingJobRequest(spec=lora_spec(self.dataset_id, base=base))
        return self.stack.training.CreateTrainingJob(request, metadata=A, timeout=30).job


@pytest.fixture
def env(tmp_path: Path, s3_settings: Settings, sqlite_url: str, tiny_random_pipeline_dir: Path) -> Iterator[Env]:
    settings = stack_settings(
        tmp_path, s3_settings, sqlite_url, auth_enabled=True, admin_tenants="ops",
        api_keys="key-a=tenant-a,key-b=tenant-b,key-ops=ops", cache_dir=tmp_path / "cache",
        adapter_ref_ttl_seconds=0.0,  # a plain name re-resolves on every request
    )
    holder: dict[str, InferenceEngine] = {}

    def bindings() -> list[Any]:
        holder["engine"] = InferenceEngine(settings, Registry.from_settings(settings))
        return inference_bindings(holder["engine"])

    with TrainingStack(settings, workers=0) as stack:
        server = ServerThread(settings, bindings).start()
        try:
            upload = iter(upload_messages(concept_images(), "photos", 4096))
            dataset = stack.training.UploadDataset(upload, metadata=A, timeout=30).dataset
            env = Env(stack, inference_pb2_grpc.InferenceServiceStub(server.channel()), dataset.id,
                      registry_pb2.ImportBaseModelResponse().base_model)
            env.v1 = env.import_(tiny_random_pipeline_dir, ADMIN)
            yield env
        finally:
            server.run(holder["engine"].close())
            server.stop()


def changed_copy(pipeline_dir: Path, dest: Path, note: str) -> Path:
    """The same loadable pipeline plus one extra file: a different digest under the same name."""
    shutil.copytree(pipeline_dir, dest)
    (dest / "NOTES.md").write_text(note)
    return dest


def test_only_admins_import_or_delete_and_tenants_are_unaffected(env: Env, tmp_path: Path,
                                                                 tiny_random_pipeline_dir: Path) -> None:
    changed = changed_copy(tiny_random_pipeline_dir, tmp_path / "changed", "B's model")
    for key in (B, A):
        for call in (lambda k=key: env.import_(changed, k), lambda k=key: env.import_(changed, k, name="mine"),
                     lambda k=key: env.delete(BASE, k), lambda k=key: env.delete(f"{BASE}@1", k)):
            err = rpc_error(call)
            assert err.code() == DENIED and "admin" in (err.details() or ""), err
    err = rpc_error(lambda: env.delete("unknown-model", B))
    assert err.code() == DENIED  # refused before looking anything up: existence is not revealed

    listed = env.stack.registry_stub.ListBaseModels(registry_pb2.ListBaseModelsRequest(), metadata=B).base_models
    assert [(m.name, m.version, m.digest) for m in listed] == [(BASE, 1, env.v1.digest)]
    generated = env.generate()
    assert generated.base_model_digest == env.v1.digest and len(generated.images) == 1
    job = env.train()
    assert job.state == training_pb2.JOB_STATE_QUEUED
    assert env.stack.store.get_job(job.id, "tenant-a").config["base_model"] == f"{BASE}@1"  # pinned at create


def test_new_bytes_are_a_new_version_and_numbers_are_never_reused(env: Env, tmp_path: Path,
                                                                  tiny_random_pipeline_dir: Path) -> None:
    again = env.import_(tiny_random_pipeline_dir, ADMIN)
    assert (again.version, again.digest) == (1, env.v1.digest)  # identical bytes: idempotent
    factory = LoraFactory(tiny_random_pipeline_dir)
    env.stack.registry.adapters.publish("tenant-a", "style", kind="LORA", base_model=BASE,
                                       base_model_digest=env.v1.digest,
                                       files={LORA_WEIGHTS_FILE: factory.write(tmp_path / "style", seed=3)})
    assert env.generate(adapter="style").base_model_digest == env.v1.digest

    v2 = env.import_(changed_copy(tiny_random_pipeline_dir, tmp_path / "v2", "version two"), ADMIN)
    assert v2.version == 2 and v2.digest != env.v1.digest
    assert env.get(BASE).version == 2 and env.get(f"{BASE}@1").digest == env.v1.digest
    assert env.generate().base_model_digest == v2.digest  # plain name: the newest version, visibly
    assert env.generate(f"{BASE}@1").base_model_digest == env.v1.digest
    err = rpc_error(lambda: env.generate(adapter="style"))  # trained on v1's bytes, not v2's
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "spec.adapters[0].ref" in details(err)["fields"]
    assert env.generate(f"{BASE}@1", adapter="style").adapters[0].name == "style"
    assert env.train(f"{BASE}@1").id

    env.delete(f"{BASE}@2", ADMIN)
    assert env.get(BASE).version == 1 and env.generate().base_model_digest == env.v1.digest
    for ref, code in [(f"{BASE}@2", grpc.StatusCode.NOT_FOUND), (f"{BASE}@9", grpc.StatusCode.NOT_FOUND),
                      (f"{BASE}@x", grpc.StatusCode.INVALID_ARGUMENT)]:
        assert rpc_error(lambda r=ref: env.get(r)).code() == code
        assert rpc_error(lambda r=ref: env.train(r)).code() == code
        if ref != f"{BASE}@2":  # a replica keeps serving a pinned version it loaded (immutable bytes)
            assert rpc_error(lambda r=ref: env.generate(r)).code() == code
    v3 = env.import_(tmp_path / "v2", ADMIN)  # v2's bytes again: a new number, 2 stays dead
    assert (v3.version, v3.digest) == (3, v2.digest)
    assert rpc_error(lambda: env.get(f"{BASE}@2")).code() == grpc.StatusCode.NOT_FOUND

    env.delete(BASE, ADMIN)  # plain name: every version
    assert rpc_error(lambda: env.generate()).code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error(lambda: env.train()).code() == grpc.StatusCode.NOT_FOUND
    assert env.import_(tiny_random_pipeline_dir, ADMIN).version == 4
