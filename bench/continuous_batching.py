"""Open-loop load: Poisson arrivals at 50 % and 90 % of measured capacity over 100 LoRAs (Zipf).

Two arms, one process, the same arrival sequences: `static` (request-level batching, pipeline
calls, heterogeneous LoRA batches) and `continuous` (ATELIER_CONTINUOUS_BATCHING: the step-level
scheduler, requests join and leave between denoising steps). Reported: p50/p99 latency against
the solo latency of the same request shape (each arm's own solo), and throughput against the
static arm's at the same offered load. Target: continuous p99 <= 2x solo at 50 % load.

  solo      one request at a time (median latency)
  capacity  closed loop, `max_batch` requests at once, requests per second (static arm: the
            offered loads are fractions of it, for both arms)
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
from services.registry.refs import AdapterRef
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
        handles = {arm: EngineHandle(loop, settings_for(
            tmp, pipeline_dir, arm, max_batch_size=args.max_batch, batch_wait_ms=20.0, device_cache_max_adapters=16,
            continuous_batching=arm == "continuous", exact_batching=False), registry)
            for arm in ("static", "continuous")}
        for handle in handles.values():
            specs = [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for n in names]
            loop.run(handle.engine.preload(TENANT, "tiny", specs, tier="host"))

        def reqs(count: int, seed: int) -> list[GenerationRequest]:
            picks = zipf_choices(ADAPTERS, count, args.zipf, seed)
            return [request([(names[k], 1.0)], steps=args.steps, seed=i) for i, k in enumerate(picks)]

        solo, capacity = {}, {}
        for arm, handle in handles.items():
            handle.generate_many(reqs(args.max_batch, 99))  # warm-up
            solo[arm] = statistics.median(_timed(handle, r) for r in reqs(5, 1))
            capacity[arm] = _capacity(handle, reqs(args.max_batch * 3, 2), args.max_batch)
        results: dict[tuple[str, float], tuple[float, float, float]] = {}
        for load in (0.5, 0.9):
            for arm, handle in handles.items():  # the same arrivals for both arms
                latencies, wall = open_loop(handle, reqs(args.requests, int(load * 10)), load * capacity["static"],
                                            seed=7)
                results[arm, load] = (pct(latencies, 0.5), pct(latencies, 0.99), args.requests / wall)
        paths = {arm: dict(h.engine.runner.paths) | dict(h.engine.stepper.paths) for arm, h in handles.items()}
        for handle in handles.values():
            handle.close()
        loop.stop()
    print_rows(f"open-loop load, {ADAPTERS} LoRAs Zipf s={args.zipf}, {args.steps} steps, max batch "
               f"{args.max_batch}, static vs continuous batching", _rows(solo, capacity, results))
    print(f"forwards/batches per path: {paths}")


def _capacity(handle: EngineHandle, burst: list[GenerationRequest], size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(burst), size):
        handle.generate_many(burst[i:i + size])
    return len(burst) / (time.perf_counter() - started)


def _rows(solo: dict[str, float], capacity: dict[str, float],
          results: dict[tuple[str, float], tuple[float, float, float]]) -> list[Row]:
    rows = []
    for arm in solo:
        rows += [Row(f"{arm}: solo latency", solo[arm] * 1000),
                 Row(f"{arm}: capacity (closed loop, batches of max batch)", capacity[arm], unit="/s")]
    for (arm, load), (p50, p99, rps) in results.items():
        label, ms = f"{arm}, {int(load * 100)} % load", solo[arm] * 1000
        gate = arm == "continuous" and load == 0.5
        rows += [
            Row(f"{label}: p50", p50 * 1000, baseline="solo", baseline_value=ms),
            Row(f"{label}: p99", p99 * 1000, baseline="solo", baseline_value=ms,
                target="<= 2x" if gate else "", ok=p99 <= 2 * solo[arm] if gate else None),
        ]
        if arm == "continuous":
            rows.append(Row(f"{label}: throughput", rps, unit="/s", baseline="static",
                            baseline_value=results["static", load][2]))
    return rows


def _timed(handle: EngineHandle, r: GenerationRequest) -> float:
    started = time.perf_counter()
    handle.generate(r)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
