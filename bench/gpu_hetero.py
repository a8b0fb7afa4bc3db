"""GPU suite rows for issue 13: 8 concurrent requests over 8 LoRAs in one UNet forward.

Split out of gpu_suite.py (which calls it for SD 1.5 shapes) to keep that file readable; it
reuses gpu_suite's pipeline builder, timing and table helpers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from _common import TENANT, EngineHandle, LoopThread
from gpu_shapes import build
from gpu_suite import median_ms, row

from services.common.config import Settings
from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.refs import AdapterRef
from services.registry.registry import Registry


def hetero_rows(kind: str, tmp: Path, args: argparse.Namespace, registry: Registry, shape: dict[str, int],
                reps: int) -> None:
    """8 concurrent requests over 8 LoRAs (per-sample deltas, one UNet forward) vs 8 on one LoRA
    batched vs the per-request loop, on a fresh pipeline (exact_batching off: the GPU setting)."""
    device = args.device
    settings = Settings(registry_url=f"file://{tmp / 'registry'}", cache_dir=tmp / "cache-hetero", data_dir=tmp,
                        inference_device=device, inference_dtype="float32" if args.cpu_smoke else "bfloat16",
                        device_cache_max_adapters=8, batch_wait_ms=100.0, max_batch_size=8, max_image_side=2048)
    loop = LoopThread()
    handle = EngineHandle(loop, settings, registry, exact_batching=False)
    handle.engine.pipelines.register(kind, build(kind, tmp / f"{kind}-hetero", device,
                                                 torch.float32 if args.cpu_smoke else torch.bfloat16, args.cpu_smoke))
    names = [f"{kind}-{i}" for i in range(8)]
    loop.run(handle.engine.preload(TENANT, kind, [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for n in names]))

    def reqs(adapter: Callable[[int], str]) -> list[GenerationRequest]:
        return [GenerationRequest(kind, "a photo of a red box", seed=i, **shape,
                                  adapters=(AdapterSpec(AdapterRef(TENANT, adapter(i)), 1.0, "x"),)) for i in range(8)]

    mixed, single = reqs(lambda i: names[i]), reqs(lambda i: names[0])
    arms = {"hetero": lambda: handle.generate_many(mixed), "one": lambda: handle.generate_many(single),
            "loop": lambda: [handle.generate(r) for r in mixed]}
    for fn in arms.values():
        fn()
    ms = {name: median_ms(fn, reps, device) for name, fn in arms.items()}
    row(f"{kind} 8 requests, 8 LoRAs, one forward (hetero)", f"{ms['hetero']:.0f} ms",
        f"{ms['one'] / ms['hetero']:.3f}x one-LoRA throughput (>= 0.9)")
    row(f"{kind} 8 requests, one LoRA, batched", f"{ms['one']:.0f} ms")
    row(f"{kind} 8 requests, 8 LoRAs, per-request loop", f"{ms['loop']:.0f} ms",
        f"hetero {ms['loop'] / ms['hetero']:.2f}x faster")
    row(f"{kind} paths taken", str(dict(handle.engine.runner.paths)))
    handle.close()
    loop.stop()
