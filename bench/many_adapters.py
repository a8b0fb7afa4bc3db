"""Many adapters: 100 LoRAs, Zipf-distributed requests, device tier 16 (target >= 0.8x of the
throughput with a single adapter).

Two engines in one process, driven alternately in chunks by `--concurrency` clients:
  single   every request uses the same LoRA
  zipf     adapter rank k is requested with probability ~ 1/k^s over 100 LoRAs; the device tier
           holds 16, so the tail keeps attaching and evicting (host tier warm, as on a replica
           that has served them before)

    .venv/bin/python bench/many_adapters.py [--requests 120] [--steps 20] [--concurrency 4] [--zipf 1.0]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from _common import (
    TENANT,
    EngineHandle,
    LoopThread,
    Row,
    print_rows,
    publish_loras,
    request,
    settings_for,
    setup_torch,
    tiny_pipeline,
)

from services.inference.types import AdapterSpec
from services.registry.refs import AdapterRef
from services.registry.registry import Registry

ADAPTERS = 100
DEVICE_TIER = 16


def zipf_choices(n: int, count: int, s: float, seed: int = 0) -> list[int]:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return random.Random(seed).choices(range(n), weights=weights, k=count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--chunk", type=int, default=20)
    args = parser.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        registry = Registry.from_settings(settings_for(tmp, pipeline_dir))
        names = [f"user-{i:03d}" for i in range(ADAPTERS)]
        publish_loras(registry, pipeline_dir, tmp, names)
        loop = LoopThread()
        single = EngineHandle(loop, settings_for(tmp, pipeline_dir, "single", max_batch_size=4), registry)
        many = EngineHandle(loop, settings_for(tmp, pipeline_dir, "many", device_cache_max_adapters=DEVICE_TIER,
                                               max_batch_size=4), registry)
        loop.run(many.engine.preload(TENANT, "tiny", [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for n in names],
                                     tier="host"))
        picks = zipf_choices(ADAPTERS, args.requests, args.zipf)
        zipf_reqs = [request([(names[k], 1.0)], steps=args.steps, seed=i) for i, k in enumerate(picks)]
        single_reqs = [request([(names[0], 1.0)], steps=args.steps, seed=i) for i in range(args.requests)]
        for handle, reqs in ((single, single_reqs), (many, zipf_reqs)):
            handle.generate_many(reqs[: args.concurrency])  # warm-up
        elapsed = {"single": 0.0, "zipf": 0.0}
        for start in range(0, args.requests, args.chunk):
            for name, handle, reqs in (("single", single, single_reqs), ("zipf", many, zipf_reqs)):
                elapsed[name] += run_chunk(handle, reqs[start:start + args.chunk], args.concurrency)
        device = many.engine.device_state.adapters.status()
        attaches = dict(many.engine.device_state.attaches)
        single.close()
        many.close()
        loop.stop()
    throughput = {name: args.requests / seconds for name, seconds in elapsed.items()}
    distinct = len(set(picks))
    print_rows(f"many adapters ({ADAPTERS} LoRAs, Zipf s={args.zipf}, device tier {DEVICE_TIER}, "
               f"{args.requests} requests x {args.steps} steps, {args.concurrency} clients)", [
        Row("single adapter", throughput["single"], unit="/s"),
        Row(f"zipf over {distinct} distinct adapters", throughput["zipf"], unit="/s", baseline="single",
            baseline_value=throughput["single"], target=">= 0.8x", ok=throughput["zipf"] >= 0.8 * throughput["single"]),
    ])
    print(f"device tier: hits {device.hits}, misses {device.misses}, evictions {device.evictions}, "
          f"attaches {attaches}")


def run_chunk(handle: EngineHandle, reqs: list, concurrency: int) -> float:  # type: ignore[type-arg]
    started = time.perf_counter()
    for i in range(0, len(reqs), concurrency):
        handle.generate_many(reqs[i:i + concurrency])
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
