"""Helpers for the inference integration tests (no tests here).

* `CountingStore`: the real object store, counting reads per key (downloads per blob).
* `InferenceEnv`: a real InferenceService on loopback over a registry on moto S3, with the
  tiny base model, plus the engine object so tests can look at the UNet.
* `spec(...)`: a GenerationSpec with tiny defaults (32 px, 3 steps).
* `diffusers_reference(...)`: the same image produced by a plain StableDiffusionPipeline;
  `reference_pipeline(...)`: such a pipeline of any class (img2img, inpaint) with the adapters.
"""

from __future__ import annotations

import io
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from transformers import CLIPTextModel

from atelier_api.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.common.config import Settings
from services.inference.engine import InferenceEngine
from services.inference.pipelines import folder_digest
from services.inference.servicer import inference_bindings
from services.registry.registry import Registry
from services.registry.store import ObjectStore, open_store
from tests.fixtures.grpc_servers import ServerThread, loopback_settings
from tests.fixtures.s3 import make_s3_settings

BASE = "tiny"
SIZE = 32
STEPS = 3
TENANT = "default"


class CountingStore:
    """Delegates to a real ObjectStore and counts reads (open_stream/get_bytes/download) per key."""

    def __init__(self, inner: ObjectStore) -> None:
        self._inner = inner
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.reads[key] += 1

    def blob_reads(self) -> dict[str, int]:
        with self._lock:
            return {k.rsplit("/", 1)[-1]: n for k, n in self.reads.items() if "/blobs/" in f"/{k}"}

    def open_stream(self, key: str) -> Iterator[bytes]:
        self._count(key)
        return self._inner.open_stream(key)

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        self._count(key)
        return self._inner.get_bytes(key)

    def download_file(self, key: str, dest_path: Path) -> None:
        self._count(key)
        self._inner.download_file(key, dest_path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def engine_settings(endpoint: str, bucket: str, tmp: Path, pipeline_dir: Path, **overrides: Any) -> Settings:
    registry = make_s3_settings(endpoint, bucket)
    values: dict[str, Any] = {
        "registry_url": registry.registry_url, "s3_endpoint_url": registry.s3_endpoint_url,
        "s3_access_key_id": registry.s3_access_key_id, "s3_secret_access_key": registry.s3_secret_access_key,
        "s3_connect_timeout_seconds": 1.0, "s3_read_timeout_seconds": 5.0, "s3_max_attempts": 1,
        "cache_dir": tmp / "cache", "data_dir": tmp / "var", "base_model_paths": f"{BASE}={pipeline_dir}",
        "device_cache_max_adapters": 3, "queue_size": 64, "max_batch_size": 4, "batch_wait_ms": 5.0,
    }
    values.update(overrides)
    return loopback_settings(**values)


@dataclass
class InferenceEnv:
    settings: Settings
    pipeline_dir: Path
    store: CountingStore
    registry: Registry
    server: ServerThread
    engine: InferenceEngine
    stub: inference_pb2_grpc.InferenceServiceStub
    digest: str
    files: dict[str, dict[str, Path]] = field(default_factory=dict)
    metadata: tuple[tuple[str, str], ...] = ()

    def publish(self, name: str, kind: str, files: dict[str, Path], trigger_tokens: Sequence[str] = (),
                base_model: str = BASE, base_model_digest: str | None = None, tenant: str = TENANT) -> None:
        self.registry.adapters.publish(
            tenant, name, kind=kind, base_model=base_model,  # type: ignore[arg-type]
            base_model_digest=self.digest if base_model_digest is None else base_model_digest,
            files=files, trigger_tokens=trigger_tokens)
        self.files[name] = files

    def generate(self, **kw: Any) -> inference_pb2.GenerateResponse:
        timeout = kw.pop("timeout", 120)
        metadata = kw.pop("metadata", self.metadata)
        return self.stub.Generate(inference_pb2.GenerateRequest(spec=spec(**kw)), timeout=timeout,
                                  metadata=metadata)

    def on_device(self, fn: Any) -> Any:
        """Run `fn()` on the engine's device thread (between pipeline calls) and return its result."""
        return self.server.run(self.engine.on_device(fn))

    def close(self) -> None:
        self.server.run(self.engine.close())
        self.server.stop()


def start_env(settings: Settings, pipeline_dir: Path, metadata: tuple[tuple[str, str], ...] = (),
              **engine_kwargs: Any) -> InferenceEnv:
    store = CountingStore(open_store(settings))
    registry = Registry(store)  # type: ignore[arg-type]
    holder: dict[str, InferenceEngine] = {}

    def bindings() -> list[Any]:
        holder["engine"] = InferenceEngine(settings, registry, **engine_kwargs)
        return inference_bindings(holder["engine"])

    server = ServerThread(settings, bindings).start()
    stub = inference_pb2_grpc.InferenceServiceStub(server.channel())
    return InferenceEnv(settings, pipeline_dir, store, registry, server, holder["engine"], stub,
                        folder_digest(pipeline_dir), metadata=metadata)


def ref(name: str, version: int | None = None, alias: str | None = None) -> common_pb2.AdapterRef:
    if version is not None:
        return common_pb2.AdapterRef(name=name, version=version)
    if alias is not None:
        return common_pb2.AdapterRef(name=name, alias=alias)
    return common_pb2.AdapterRef(name=name)


def spec(prompt: str = "a red box", adapters: Sequence[tuple[str, float]] = (), seed: int | None = 1,
         steps: int = STEPS, base_model: str = BASE, size: int = SIZE, **kw: Any) -> inference_pb2.GenerationSpec:
    out = inference_pb2.GenerationSpec(
        base_model=base_model, prompt=prompt, steps=steps, width=kw.pop("width", size),
        height=kw.pop("height", size), adapters=[inference_pb2.AdapterWeight(ref=ref(n), weight=w)
                                                 for n, w in adapters], **kw)
    if seed is not None:
        out.seed = seed
    return out


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def rpc_error(call: Any) -> grpc.RpcError:
    try:
        call()
    except grpc.RpcError as err:
        return err
    raise AssertionError("the call succeeded")


def details(err: grpc.RpcError) -> dict[str, Any]:
    """{'fields': [...], 'retry_after': seconds | None} from the google.rpc status details."""
    out: dict[str, Any] = {"fields": [], "retry_after": None}
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            out["fields"] += [v.field for v in bad.field_violations]
        elif detail.Unpack(retry):
            out["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return out


def diffusers_reference(pipeline_dir: Path, prompt: str = "a red box", seed: int = 1, steps: int = STEPS,
                        lora: tuple[Path, float] | None = None, fuse: bool = True,
                        ti: tuple[Path, str] | None = None, dreambooth: Path | None = None) -> np.ndarray:
    """The same generation with nothing but diffusers (no Atelier code)."""
    pipe = reference_pipeline(pipeline_dir, lora, fuse, ti, dreambooth)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        image = pipe(prompt, num_inference_steps=steps, height=SIZE, width=SIZE, generator=generator).images[0]
    return np.asarray(image).astype(np.int16)


def reference_pipeline(pipeline_dir: Path, lora: tuple[Path, float] | None = None, fuse: bool = True,
                       ti: tuple[Path, str] | None = None, dreambooth: Path | None = None,
                       cls: Any = StableDiffusionPipeline) -> Any:
    """A plain diffusers pipeline of `cls` (txt2img, img2img, inpaint) with the adapters loaded."""
    pipe = cls.from_pretrained(pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if dreambooth is not None:
        pipe.unet = UNet2DConditionModel.from_pretrained(dreambooth / "unet")
        if (dreambooth / "text_encoder").is_dir():
            pipe.text_encoder = CLIPTextModel.from_pretrained(dreambooth / "text_encoder")
    if lora is not None:
        pipe.load_lora_weights(str(lora[0].parent), weight_name=lora[0].name, adapter_name="ref")
        pipe.set_adapters(["ref"], [lora[1]])
        if fuse:
            pipe.fuse_lora(adapter_names=["ref"])
    if ti is not None:
        pipe.load_textual_inversion(str(ti[0]), token=ti[1])
    return pipe
