"""Open-loop load: Poisson arrivals at 50 % and 90 % of measured capacity over 100 LoRAs (Zipf).

Measures what the engine does today: request-level (static) batching, with heterogeneous LoRA
batching letting different adapters share a batch. Reported: p50/p99 latency against the solo
latency of the same request shape, and achieved throughput. The step-level (continuous)
scheduler of issue 13 is not built yet, so there is no continuous arm: these rows are its
baseline (target for it: p99 <= 2x solo at 50 % load).

  solo      one request at a time (median latency)
  capacity  closed loop, `max_batch` requests at once, requests per second
  load X %  Poisson arrivals at X % of capacity, Zipf(s) adapter choice over 100 LoRAs

    .venv/bin/python bench/continuous_batching.py [--requests 40] [--steps 10] [--max-batch 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
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
from many_adapters import zipf_choices

from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.registry import Registry

ADAPTERS = 100


def open_loop(handle: EngineHandle, reqs: list[GenerationRequest], rate: float, seed: int) -> tuple[list[float], float]:
    """Send `reqs` with exponential gaps (mean 1/rate); per-request latencies and wall time."""
    gaps = random.Random(seed).expovariate

    async def run() -> tuple[list[float], float]:
        started = time.perf_counter()

        async def one(r: GenerationRequest, at: float) -> float:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - started)))
            sent = time.perf_counter()
            await handle.engine.generate(TENANT, r)
            return time.perf_counter() - sent

        at, tasks = 0.0, []
        for r in reqs:
            tasks.append(asyncio.ensure_future(one(r, at)))
            at += gaps(rate)
        latencies = list(await asyncio.gather(*tasks))
        return latencies, time.perf_counter() - started

    return handle.loop.run(run())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--zipf", type=float, default=1.0)
    args = parser.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        registry = Registry.from_settings(settings_for(tmp, pipeline_dir))
        names = [f"user-{i:03d}" for i in range(ADAPTERS)]
        publish_loras(registry, pipeline_dir, tmp, names)
        loop = LoopThread()
        handle = EngineHandle(loop, settings_for(tmp, pipeline_dir, "engine", max_batch_size=args.max_batch,
                                                 batch_wait_ms=20.0, device_cache_max_adapters=16), registry)
        loop.run(handle.engine.preload(TENANT, "tiny", [AdapterSpec(n, None, None, 1.0, "x") for n in names],
                                       tier="host"))

        def reqs(count: int, seed: int) -> list[GenerationRequest]:
            picks = zipf_choices(ADAPTERS, count, args.zipf, seed)
            return [request([(names[k], 1.0)], steps=args.steps, seed=i) for i, k in enumerate(picks)]

        handle.generate_many(reqs(args.max_batch, 99))  # warm-up
        solo = statistics.median(_timed(handle, r) for r in reqs(5, 1))
        burst = reqs(args.max_batch * 3, 2)
        started = time.perf_counter()
        for i in range(0, len(burst), args.max_batch):
            handle.generate_many(burst[i:i + args.max_batch])
        capacity = len(burst) / (time.perf_counter() - started)
        results = {}
        for load in (0.5, 0.9):
            latencies, wall = open_loop(handle, reqs(args.requests, int(load * 10)), load * capacity, seed=7)
            results[load] = (pct(latencies, 0.5), pct(latencies, 0.99), args.requests / wall)
        paths = dict(handle.engine.runner.paths)
        handle.close()
        loop.stop()
    rows = [Row("solo latency", solo * 1000), Row("capacity (closed loop, static batches)", capacity, unit="/s")]
    for load, (p50, p99, rps) in results.items():
        label = f"{int(load * 100)} % load"
        rows += [
            Row(f"{label}: p50", p50 * 1000, baseline="solo", baseline_value=solo * 1000),
            Row(f"{label}: p99", p99 * 1000, baseline="solo", baseline_value=solo * 1000,
                target="<= 2x (50 %)" if load == 0.5 else "", ok=p99 <= 2 * solo if load == 0.5 else None),
            Row(f"{label}: throughput", rps, unit="/s", baseline="offered", baseline_value=load * capacity),
        ]
    print_rows(f"open-loop load, {ADAPTERS} LoRAs Zipf s={args.zipf}, {args.steps} steps, max batch "
               f"{args.max_batch}, static batching (no continuous arm yet)", rows)
    print(f"paths taken: {paths}")


def _timed(handle: EngineHandle, r: GenerationRequest) -> float:
    started = time.perf_counter()
    handle.generate(r)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
