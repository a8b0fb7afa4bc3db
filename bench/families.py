"""Every model family on the CPU: generation with adapters and LoRA training, each against plain
diffusers in the same run, on the tiny random pipelines (services.tinymodel.families).

Per family (sd1, sdxl, flux), arms interleaved in one process, 32 px, one thread:
  engine base / 1 cached LoRA / 3 mixed LoRAs      (target: 1 LoRA <= 1.05x base)
  engine round robin over 8 cached LoRAs           (end to end: a switch per request)
  diffusers base / unfused 1 LoRA / load+unload per request
  one switch timed directly: engine restore + merge on its device thread vs diffusers'
    load_lora_weights + unload_lora_weights (target: the engine's >= 5x cheaper)
Then bench/train_throughput.py --model tiny-<family> (ours vs the diffusers/peft loop, own
processes) unless --skip-training.

    .venv/bin/python bench/families.py [--families sdxl,flux] [--rounds 16] [--steps 8]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    ROOT,
    TENANT,
    EngineHandle,
    LoopThread,
    Row,
    interleaved,
    print_rows,
    settings_for,
    setup_torch,
    timed_ms,
)
from diffusers import DiffusionPipeline
from gpu_shapes import random_lora
from safetensors.torch import save_file

from services.families.flux.inference import MAX_SEQUENCE_LENGTH
from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.tinymodel.families import build_tiny_family

PROMPT = "a red box on a blue floor"
SIZE = 32
FLUX_SEQUENCE = MAX_SEQUENCE_LENGTH  # T5 tokens for the diffusers arms: what the engine encodes


def plain(folder: Path) -> Any:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe: Any, family: str, steps: int) -> None:
    extra = {"max_sequence_length": FLUX_SEQUENCE} if family == "flux" else {}
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=steps, height=SIZE, width=SIZE,
             generator=torch.Generator().manual_seed(1), **extra)


def publish(registry: Registry, pipe: Any, family: str, tmp: Path, count: int) -> list[tuple[Path, str]]:
    files = []
    for i in range(count):
        path = tmp / "loras" / f"{family}-{i}" / LORA_WEIGHTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(random_lora(pipe, 4, seed=100 + i), str(path))
        registry.adapters.publish(TENANT, f"l{i}", kind="LORA", base_model="tiny", base_family=family,
                                  files={LORA_WEIGHTS_FILE: path})
        files.append((path, f"l{i}"))
    return files


def request(adapters: list[tuple[str, float]], steps: int) -> GenerationRequest:
    specs = tuple(AdapterSpec(AdapterRef(TENANT, n), w, f"spec.adapters[{i}]") for i, (n, w) in enumerate(adapters))
    return GenerationRequest("tiny", PROMPT, adapters=specs, steps=steps, width=SIZE, height=SIZE, seed=1)


def generation(family: str, tmp: Path, args: argparse.Namespace) -> None:
    folder = build_tiny_family(family, tmp / f"tiny-{family}", seed=0)
    registry = Registry.from_settings(settings_for(tmp, folder))
    reference = plain(folder)
    loras = publish(registry, reference, family, tmp, 8)
    loop = LoopThread()
    engine = EngineHandle(loop, settings_for(tmp, folder, "engine"), registry)
    rr = EngineHandle(loop, settings_for(tmp, folder, "round-robin"), registry)
    loop.run(rr.engine.preload(TENANT, "tiny", [AdapterSpec(AdapterRef(TENANT, n), 1.0, "x") for _, n in loras]))
    unfused = plain(folder)
    unfused.load_lora_weights(str(loras[0][0]), adapter_name="l0")
    cycle = itertools.cycle(range(8))

    def load_unload() -> None:
        path, name = loras[next(cycle)]
        reference.load_lora_weights(str(path), adapter_name=name)
        plain_call(reference, family, args.steps)
        reference.unload_lora_weights()

    plain_base = plain(folder)
    one, three = [("l0", 1.0)], [("l0", 0.7), ("l1", 0.5), ("l2", 0.3)]
    arms = {
        "engine base": lambda: engine.generate(request([], args.steps)),
        "engine 1 LoRA": lambda: engine.generate(request(one, args.steps)),
        "engine 3 LoRAs": lambda: engine.generate(request(three, args.steps)),
        "engine round robin": lambda: rr.generate(request([(f"l{next(cycle)}", 1.0)], args.steps)),
        "diffusers base": lambda: plain_call(plain_base, family, args.steps),
        "diffusers 1 LoRA": lambda: plain_call(unfused, family, args.steps),
        "diffusers load+unload": load_unload,
    }
    for fn in arms.values():
        fn()
        fn()
    ms = interleaved(arms, args.rounds)
    ms |= switch_costs(loop, rr, reference, loras)
    for handle in (engine, rr):
        handle.close()
    loop.stop()
    report(family, ms, args)


def switch_costs(loop: LoopThread, handle: EngineHandle, pipe: Any, loras: list[tuple[Path, str]]) -> dict[str, float]:
    """One switch timed directly, immune to generation noise: the engine's restore + merge of the
    next cached adapter on its device thread, and diffusers' load_lora_weights + unload."""
    engine = handle.engine
    base = engine.pipelines.get("tiny")
    specs = [[AdapterSpec(AdapterRef(TENANT, name), 1.0, "x")] for _, name in loras]
    uses = [loop.run(engine._load(loop.run(engine._resolve(TENANT, spec, base)), spec)) for spec in specs]
    ours = [loop.run(engine.on_device(timed_ms, lambda i=i: engine.device_state.prepare(base, uses[i % 8])))
            for i in range(24)]

    def load_unload(i: int) -> None:
        path, name = loras[i % 8]
        pipe.load_lora_weights(str(path), adapter_name=name)
        pipe.unload_lora_weights()

    theirs = [timed_ms(lambda i=i: load_unload(i)) for i in range(24)]
    return {"engine switch": statistics.median(ours), "diffusers switch": statistics.median(theirs)}


def report(family: str, ms: dict[str, float], args: argparse.Namespace) -> None:
    ours_switch, theirs_switch = ms["engine switch"], ms["diffusers switch"]
    base = ms["engine base"]
    print_rows(f"{family}: tiny random pipeline, {SIZE} px, {args.steps} steps, median of {args.rounds}", [
        Row("engine, base", base),
        Row("engine, 1 cached LoRA", ms["engine 1 LoRA"], baseline="engine base", baseline_value=base,
            target="<= 1.05x", ok=ms["engine 1 LoRA"] <= 1.05 * base),
        Row("engine, 3 mixed LoRAs", ms["engine 3 LoRAs"], baseline="engine base", baseline_value=base),
        Row("engine, round robin over 8 LoRAs", ms["engine round robin"], baseline="engine 1 LoRA",
            baseline_value=ms["engine 1 LoRA"]),
        Row("diffusers, base", ms["diffusers base"], baseline="engine base", baseline_value=base),
        Row("diffusers, 1 LoRA unfused", ms["diffusers 1 LoRA"], baseline="engine 1 LoRA",
            baseline_value=ms["engine 1 LoRA"]),
        Row("diffusers, load+unload per request", ms["diffusers load+unload"], baseline="diffusers 1 LoRA",
            baseline_value=ms["diffusers 1 LoRA"]),
        Row("switch, engine restore+merge (timed)", ours_switch),
        Row("switch, diffusers load+unload (timed)", theirs_switch, baseline="engine switch",
            baseline_value=ours_switch, target=">= 5x", ok=theirs_switch >= 5 * ours_switch),
    ])


def training(family: str) -> None:
    model = "tiny" if family == "sd1" else f"tiny-{family}"
    print(f"\n== {family}: LoRA training, bench/train_throughput.py --model {model} ==", flush=True)
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--model", model, "--resolution", "32",
           "--steps", "20", "--warmup", "3", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    print(proc.stdout if proc.returncode == 0 else f"FAILED ({proc.returncode}): {proc.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="sd1,sdxl,flux")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    setup_torch()
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            generation(family, Path(tmp), args)
        if not args.skip_training:
            training(family)


if __name__ == "__main__":
    main()
