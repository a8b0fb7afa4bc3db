"""Heterogeneous LoRA batching: 8 concurrent requests over 8 different LoRAs in one UNet forward.

Arms (one engine each, one process, interleaved rounds, medians of a round's wall time):
  hetero        8 requests, 8 different LoRAs, max batch 8: per-sample deltas (hetero.py)
  hetero-fast   the same with exact_batching=false (VAE decodes the batch at once)
  one-lora      8 requests on one LoRA, batched, exact mode (merged weights, UNet per request)
  one-lora-fast 8 requests on one LoRA, batched, exact_batching=false (merged, one forward)
  per-request   8 requests, 8 LoRAs, max batch 1: one pipeline call per request (the loop a
                replica ran before: different LoRAs never shared a batch)
  stream-hetero / stream-one  the same two workloads on the step-level scheduler
                (continuous_batching, exact_batching=false): hooks built once per running-set
                composition instead of once per batch, one UNet forward per step

Targets: hetero >= 0.9x the throughput of one LoRA batched together; the speed-up over the
per-request loop is reported.

    .venv/bin/python bench/hetero_batching.py [--steps 10] [--rounds 5] [--size 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import (
    TENANT,
    EngineHandle,
    LoopThread,
    Row,
    interleaved,
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

N = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        registry = Registry.from_settings(settings_for(tmp, pipeline_dir))
        names = [f"tenant-{i}" for i in range(N)]
        publish_loras(registry, pipeline_dir, tmp, names)
        loop = LoopThread()
        batched = {"max_batch_size": N, "batch_wait_ms": 200.0}
        engines = {
            "hetero": EngineHandle(loop, settings_for(tmp, pipeline_dir, "hetero", **batched), registry),
            "hetero-fast": EngineHandle(loop, settings_for(tmp, pipeline_dir, "hetero-fast", **batched), registry,
                                        exact_batching=False),
            "one-lora": EngineHandle(loop, settings_for(tmp, pipeline_dir, "one", **batched), registry),
            "one-lora-fast": EngineHandle(loop, settings_for(tmp, pipeline_dir, "fast", **batched), registry,
                                          exact_batching=False),
            "per-request": EngineHandle(loop, settings_for(tmp, pipeline_dir, "loop"), registry),
            **{arm: EngineHandle(loop, settings_for(tmp, pipeline_dir, arm, continuous_batching=True, **batched),
                                 registry, exact_batching=False) for arm in ("stream-hetero", "stream-one")},
        }
        specs = [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for n in names]
        for handle in engines.values():
            one = handle in (engines["one-lora"], engines["stream-one"])
            loop.run(handle.engine.preload(TENANT, "tiny", specs[:1] if one else specs))
        mixed = [request([(names[i], 1.0)], steps=args.steps, seed=i, size=args.size) for i in range(N)]
        single = [request([(names[0], 1.0)], steps=args.steps, seed=i, size=args.size) for i in range(N)]
        work = {"hetero": mixed, "hetero-fast": mixed, "one-lora": single, "one-lora-fast": single,
                "per-request": mixed, "stream-hetero": mixed, "stream-one": single}
        arms = {name: (lambda h=engines[name], r=work[name]: h.generate_many(r)) for name in engines}
        for fn in arms.values():
            fn()  # warm-up
        ms = interleaved(arms, args.rounds)
        paths = {name: dict(h.engine.runner.paths) | dict(h.engine.stepper.paths) for name, h in engines.items()}
        for handle in engines.values():
            handle.close()
        loop.stop()
    rps = {name: N / (value / 1000) for name, value in ms.items()}
    print_rows(f"hetero batching ({N} requests, {args.steps} steps, {args.size} px, CPU tiny)", [
        Row("one LoRA, batched (exact, UNet per request)", rps["one-lora"], unit="/s"),
        Row("one LoRA, batched (one forward)", rps["one-lora-fast"], unit="/s"),
        Row("per-request loop, 8 LoRAs", rps["per-request"], unit="/s"),
        Row("hetero-fast, 8 LoRAs vs one LoRA (one forward)", rps["hetero-fast"], unit="/s",
            baseline="one-lora-fast", baseline_value=rps["one-lora-fast"], target=">= 0.9x",
            ok=rps["hetero-fast"] >= 0.9 * rps["one-lora-fast"]),
        Row("hetero, 8 LoRAs vs one LoRA (exact)", rps["hetero"], unit="/s", baseline="one-lora",
            baseline_value=rps["one-lora"], target=">= 0.9x", ok=rps["hetero"] >= 0.9 * rps["one-lora"]),
        Row("hetero vs per-request loop (speed-up)", rps["hetero"], unit="/s", baseline="per-request",
            baseline_value=rps["per-request"], target="report"),
        Row("one LoRA, step loop (one forward per step)", rps["stream-one"], unit="/s"),
        Row("step loop, 8 LoRAs vs one LoRA", rps["stream-hetero"], unit="/s", baseline="stream-one",
            baseline_value=rps["stream-one"], target=">= 0.9x", ok=rps["stream-hetero"] >= 0.9 * rps["stream-one"]),
        Row("step loop 8 LoRAs vs one LoRA batched (one forward, pipeline)", rps["stream-hetero"], unit="/s",
            baseline="one-lora-fast", baseline_value=rps["one-lora-fast"], target=">= 0.9x",
            ok=rps["stream-hetero"] >= 0.9 * rps["one-lora-fast"]),
        Row("step loop 8 LoRAs vs per-request loop (speed-up)", rps["stream-hetero"], unit="/s",
            baseline="per-request", baseline_value=rps["per-request"], target="report"),
    ])
    print(f"paths taken: {paths}")


if __name__ == "__main__":
    main()
