"""A `ChaosContext` over a real `start_runtime("all")` (auth on, tenants a/b/fuzz, admin ops) for
the input rows' tests: the same object bench/chaos.py hands to bench/chaos_inputs.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench._chaos_ctx import ChaosContext
from services.common.config import Settings
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.registry import Registry
from services.runtime import Runtime, start_runtime
from tests.fixtures.grpc_servers import loopback_settings
from tests.fixtures.s3 import free_port
from tests.fixtures.synthetic import LoraFactory

KEYS = {"tenant-a": "key-a", "tenant-b": "key-b", "fuzz": "key-fuzz", "ops": "key-ops"}
BASE = "tiny"


def stack_settings(tmp: Path, registry_url: str, **overrides: object) -> Settings:
    """Embedded-default settings on loopback with auth and the four tenants."""
    values: dict[str, object] = {
        "auth_enabled": True, "api_keys": ",".join(f"{k}={t}" for t, k in KEYS.items()), "admin_tenants": "ops",
        "registry_url": registry_url, "database_url": f"sqlite:///{tmp / 'jobs.db'}", "data_dir": tmp / "var",
        "cache_dir": tmp / "cache", "training_port": free_port(), "inference_port": free_port(),
        "worker_poll_seconds": 0.2, "max_inference_steps": 50,
    }
    if "http_port" in Settings.model_fields:
        values["http_port"] = 0  # no HTTP gateway: these rows are about the gRPC surface
    values.update(overrides)
    return loopback_settings(**values)


@contextmanager
def chaos_context(settings: Settings, pipeline_dir: Path, tmp: Path) -> Iterator[ChaosContext]:
    """Start the runtime for `settings` with `pipeline_dir` imported as BASE; yield the context."""
    registry = Registry.from_settings(settings)
    registry.base_models.import_folder(BASE, pipeline_dir)
    factory = LoraFactory(pipeline_dir)
    seeds = iter(range(1000))

    def make_lora(tenant: str, name: str) -> int:
        seed = next(seeds)  # bytes of its own: blobs are content addressed, shared by identical files
        path = factory.write(tmp / "loras" / f"{tenant}-{name}-{seed}", seed=seed)
        return registry.adapters.publish(tenant, name, kind="LORA", base_model=BASE,
                                        files={LORA_WEIGHTS_FILE: path}).version

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runtime: Runtime = asyncio.run_coroutine_threadsafe(start_runtime(settings, "all"), loop).result(120)
    try:
        yield ChaosContext(
            training_target=f"127.0.0.1:{settings.training_port}",
            inference_target=f"127.0.0.1:{settings.inference_port}", api_keys=dict(KEYS),
            registry_settings=settings, base_model=BASE, pipeline_dir=pipeline_dir, make_lora=make_lora,
            tmp_dir=tmp / "scratch", quick=True)
    finally:
        asyncio.run_coroutine_threadsafe(runtime.close(0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
