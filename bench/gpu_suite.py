"""GPU suite (one H100/H200, < 10 min, nothing downloaded): training it/s, generation latency, switching.

Pipelines are SD 1.5-, SDXL- and Flux-shaped with random weights built from the published configs
(bench/gpu_shapes.py; Flux at full width, reduced depth), the project's own tokenizer, bf16 on
CUDA. Timings do not depend on what the weights are. Prints one table with ratios:

  training   LoRA it/s, SD1.5 512 px, SDXL and Flux 1024 px: Atelier's trainer vs the plain
             diffusers/peft loop (bench/train_throughput.py, each side in its own process)
  generate   30-step latency through the InferenceEngine: base, 1 LoRA, 3 mixed LoRAs, next to
             plain diffusers (unfused LoRA via set_adapters), per family
  switch     round-robin over 8 cached LoRAs vs the same one; one switch timed directly (ours:
             restore + merge) vs diffusers load_lora_weights + unload_lora_weights
  memory     peak GPU memory per phase

    .venv/bin/python bench/gpu_suite.py                # on a CUDA machine
    .venv/bin/python bench/gpu_suite.py --cpu-smoke    # tiny shapes on CPU: checks the plumbing only
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import ROOT, TENANT, EngineHandle, LoopThread
from gpu_shapes import build, random_lora
from safetensors.torch import save_file

from services.common.config import Settings
from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry

ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, ratio: str = "") -> None:
    ROWS.append((name, value, ratio))
    print(f"  {name:<58} {value:>14} {ratio}", flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call, synchronised before and after so queued GPU work is counted."""
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - started) * 1000


def median_ms(fn: Callable[[], object], reps: int, device: str) -> float:
    return statistics.median(timed_ms(fn, device) for _ in range(reps))


def free(device: str) -> str:
    """Collect what earlier phases left (engines hold reference cycles); reset the peak."""
    gc.collect()
    if not device.startswith("cuda"):
        return "n/a"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB resident at start"


def peak_gib(device: str) -> str:
    if not device.startswith("cuda"):
        return "n/a"
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"{value:.1f} GiB"


def diffusers_arms(pipe: Any, loras: list[dict[str, torch.Tensor]], req: dict[str, Any], reps: int,
                   device: str, three: bool) -> dict[str, float]:
    """Plain diffusers on its own copy of the pipeline: base, unfused 1 (and 3) LoRAs, load+unload."""
    def call() -> None:
        with torch.no_grad():
            pipe(**req, generator=torch.Generator().manual_seed(1))

    call()  # warm, as the engine's arms are
    out = {"base": median_ms(call, reps, device)}
    for i in range(3 if three else 1):
        pipe.load_lora_weights(dict(loras[i]), adapter_name=f"l{i}")
    pipe.set_adapters(["l0"], [1.0])
    out["1 LoRA"] = median_ms(call, reps, device)
    if three:
        pipe.set_adapters(["l0", "l1", "l2"], [0.7, 0.5, 0.3])
        out["3 LoRAs"] = median_ms(call, reps, device)
    pipe.unload_lora_weights()

    def switch() -> None:
        pipe.load_lora_weights(dict(loras[3]), adapter_name="x")
        pipe.unload_lora_weights()

    out["switch"] = median_ms(switch, reps, device)
    return out


def generation(kind: str, tmp: Path, args: argparse.Namespace) -> None:
    device, dtype, smoke = args.device, torch.bfloat16 if not args.cpu_smoke else torch.float32, args.cpu_smoke
    size = (64 if smoke else 512) if kind == "sd15" else (64 if smoke else 1024)
    steps, reps = (2, 2) if smoke else (30, 5 if kind == "sd15" else 3)
    resident = free(device)
    settings = Settings(registry_url=f"file://{tmp / 'registry'}", cache_dir=tmp / "cache", data_dir=tmp,
                        inference_device=device, inference_dtype="float32" if smoke else "bfloat16",
                        device_cache_max_adapters=8, batch_wait_ms=0.0, max_batch_size=1, max_image_side=2048)
    registry = Registry.from_settings(settings)
    loop = LoopThread()
    handle = EngineHandle(loop, settings, registry)
    pipe = build(kind, tmp / kind, device, dtype, smoke)
    handle.engine.pipelines.register(kind, pipe)
    loras = [random_lora(pipe, 16, seed) for seed in range(8)]
    for i, lora in enumerate(loras):
        path = tmp / "loras" / f"{kind}-{i}" / LORA_WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(lora, str(path))
        registry.adapters.publish(TENANT, f"{kind}-{i}", kind="LORA", base_model=kind, files={LORA_WEIGHTS_FILE: path})

    def req(adapters: list[tuple[str, float]]) -> GenerationRequest:
        specs = tuple(AdapterSpec(AdapterRef(TENANT, n), w, "x") for n, w in adapters)
        return GenerationRequest(kind, "a photo of a red box", adapters=specs, steps=steps, width=size, height=size,
                                 seed=1)

    arms = {"base": req([]), "1 LoRA": req([(f"{kind}-0", 1.0)]),
            "3 LoRAs": req([(f"{kind}-0", 0.7), (f"{kind}-1", 0.5), (f"{kind}-2", 0.3)])}
    ours = {}
    for name, r in arms.items():
        handle.generate(r)  # warm: attach, merge, kernels
        ours[name] = median_ms(lambda r=r, h=handle: h.generate(r), reps, device)
    print(f"\n[{kind}] {size} px, {steps} steps, bf16 ({'CPU smoke' if smoke else device})")
    for name in arms:
        row(f"{kind} generate, engine, {name}", f"{ours[name]:.0f} ms",
            f"{ours[name] / ours['base']:.3f}x base" if name != "base" else "")
    row(f"{kind} peak GPU memory, engine", peak_gib(device), resident)
    switching(handle, loop, kind, req, reps, device, ours)
    handle.close()
    loop.stop()
    del handle, loop, pipe  # the engine's pipeline must not count in the diffusers arm's peak
    resident = free(device)
    plain = build(kind, tmp / f"{kind}-plain", device, dtype, smoke)
    theirs = diffusers_arms(plain, loras, dict(prompt="a photo of a red box", num_inference_steps=steps,
                                                height=size, width=size), reps, device, "3 LoRAs" in arms)
    for name in ("base", "1 LoRA", "3 LoRAs"):
        if name in arms:
            row(f"{kind} generate, diffusers unfused, {name}", f"{theirs[name]:.0f} ms",
                f"engine {ours[name] / theirs[name]:.3f}x")
    row(f"{kind} switch, diffusers load+unload", f"{theirs['switch']:.1f} ms")
    row(f"{kind} peak GPU memory, diffusers", peak_gib(device), resident)
    del plain
    if kind == "sd15":
        from gpu_hetero import hetero_rows  # late: gpu_hetero uses this module's helpers

        hetero_rows(kind, tmp, args, registry, dict(steps=steps, width=size, height=size), reps)


def switching(handle: EngineHandle, loop: LoopThread, kind: str, req: Callable[..., GenerationRequest],
              reps: int, device: str, ours: dict[str, float]) -> None:
    names = [f"{kind}-{i}" for i in range(8)]
    loop.run(handle.engine.preload(TENANT, kind, [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for n in names]))
    cycle = iter(range(10**6))
    rr = median_ms(lambda: handle.generate(req([(names[next(cycle) % 8], 1.0)])), max(reps, 8), device)
    row(f"{kind} generate, round robin over 8 cached LoRAs", f"{rr:.0f} ms", f"{rr / ours['1 LoRA']:.3f}x same")
    engine = handle.engine
    base = engine.pipelines.get(kind)
    one = [[AdapterSpec(AdapterRef(TENANT, n), 1.0, "x")] for n in names]
    uses = [loop.run(engine._load(loop.run(engine._resolve(TENANT, spec, base)), spec)) for spec in one]

    # Timed on the device thread: Prepared.attach_ms is host time only, and the restore copies
    # and merge GEMMs it launches would still be running on the GPU.
    times = [loop.run(engine.on_device(timed_ms, lambda i=i: engine.device_state.prepare(base, uses[i % 8]), device))
             for i in range(16)]
    row(f"{kind} switch, engine restore+merge (timed)", f"{statistics.median(times):.1f} ms")


TRAIN_RUNS = (  # (train_throughput --model, resolution, timed steps, timeout s); smoke: tiny-*, 32 px
    ("sd15", 512, 30, 240),
    ("sdxl", 1024, 15, 300),
    ("flux", 1024, 15, 300),
)


def training(args: argparse.Namespace) -> None:
    """LoRA it/s, Atelier's run_training vs the plain diffusers/peft loop, per model family."""
    for model, resolution, steps, timeout in TRAIN_RUNS:
        smoke = args.cpu_smoke
        name, side = (("tiny" if model == "sd15" else f"tiny-{model}"), 32) if smoke else (model, resolution)
        print(f"\n[training] {model} {side} px: bench/train_throughput.py --model {name}", flush=True)
        cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", args.device,
               "--model", name, "--resolution", str(side), "--precision", "no" if smoke else "bf16",
               "--batch", "1", "--steps", str(3 if smoke else steps), "--warmup", str(2 if smoke else 5)]
        out = run_group(cmd, timeout)
        train_rows(out, f"{model} train ({side} px, batch 1)")


def run_group(cmd: list[str], timeout: float) -> str:
    """Run in its own session: on timeout the whole group dies, so no orphaned child keeps the
    GPU busy while later phases are timed (subprocess.run's timeout kills the direct child only)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    print(out[-3000:])
    if proc.returncode != 0:
        print(f"{cmd[1]} exited {proc.returncode}:\n{err[-3000:]}")
    return out


def train_rows(report: str, label: str) -> None:
    """Rows from train_throughput.py's table: run, steps/s, median, end-to-end s, RSS MiB, CUDA MiB."""
    runs: dict[str, list[float]] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) == 6 and parts[0] in ("reference", "ours"):
            try:
                runs[parts[0]] = [float(p) for p in parts[1:]]
            except ValueError:
                continue
    if set(runs) != {"reference", "ours"}:
        row(label, "FAILED", "see output above")
        return
    ref, ours = runs["reference"], runs["ours"]
    row(f"{label}, diffusers/peft reference loop", f"{ref[1]:.2f} it/s", "median step")
    row(f"{label}, Atelier run_training", f"{ours[1]:.2f} it/s", f"{ours[1] / ref[1]:.2f}x reference loop")
    row(f"{label} peak GPU memory, reference / ours", f"{ref[4] / 1024:.1f} / {ours[4] / 1024:.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, to check the plumbing")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    args.device = "cpu" if args.cpu_smoke else "cuda"
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available; nothing to do (use --cpu-smoke to check the plumbing)")
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if not args.skip_training:
            training(args)
        for kind in ("sd15", "sdxl", "flux"):
            generation(kind, tmp / kind, args)
    print(f"\n== gpu suite summary ({time.perf_counter() - started:.0f} s) ==")
    for name, value, ratio in ROWS:
        print(f"{name:<58} {value:>14} {ratio}")


if __name__ == "__main__":
    main()
