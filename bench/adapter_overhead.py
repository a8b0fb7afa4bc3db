"""Adapter overhead: generation with one cached LoRA vs the bare base model (target <= 1.05x).

Arms, interleaved in one process (tiny model, 32 px, 20 steps, CPU, one thread):
  bare       engine that never saw an adapter
  lora       engine serving the same cached LoRA every time (merged into the weights)
  attached   engine with a LoRA attached but serving base requests (wrappers on the fast path)
  diffusers base / unfused LoRA / empty wrappers: plain diffusers for context, the last one after
             `delete_adapters`, which leaves empty peft wrapper modules behind.

    .venv/bin/python bench/adapter_overhead.py [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _common import (
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
from diffusers import StableDiffusionPipeline

from services.inference.types import AdapterSpec
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry


def plain_pipeline(pipeline_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_call(pipe: StableDiffusionPipeline, steps: int) -> None:
    with torch.no_grad():
        pipe(
            "a red box on a blue floor",
            num_inference_steps=steps,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(1),
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        registry = Registry.from_settings(settings_for(tmp, pipeline_dir))
        publish_loras(registry, pipeline_dir, tmp, ["style"])
        loop = LoopThread()
        bare = EngineHandle(loop, settings_for(tmp, pipeline_dir, "bare"), registry)
        lora = EngineHandle(loop, settings_for(tmp, pipeline_dir, "lora"), registry)
        attached = EngineHandle(loop, settings_for(tmp, pipeline_dir, "attached"), registry)
        style = AdapterRef(TENANT_DEFAULT, "style")
        loop.run(attached.engine.preload(TENANT_DEFAULT, "tiny", [AdapterSpec(style, 1.0, "x")]))
        lora_file = registry.adapters.resolve(AdapterRef(TENANT_DEFAULT, "style")).files[0]
        local = registry.blobs.download(lora_file.sha256, tmp / "style.safetensors")
        diffusers_base = plain_pipeline(pipeline_dir)
        diffusers_lora = plain_pipeline(pipeline_dir)
        diffusers_lora.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name="style")
        diffusers_empty = plain_pipeline(pipeline_dir)
        diffusers_empty.load_lora_weights(str(local.parent), weight_name=local.name, adapter_name="style")
        diffusers_empty.delete_adapters(["style"])

        base_req, lora_req = request(steps=args.steps), request([("style", 1.0)], steps=args.steps)
        arms = {
            "bare": lambda: bare.generate(base_req),
            "lora": lambda: lora.generate(lora_req),
            "attached": lambda: attached.generate(base_req),
            "diffusers base": lambda: plain_call(diffusers_base, args.steps),
            "diffusers unfused": lambda: plain_call(diffusers_lora, args.steps),
            "diffusers empty wrappers": lambda: plain_call(diffusers_empty, args.steps),
        }
        for fn in arms.values():  # warm-up: loads, first merge, allocator
            fn()
            fn()
        ms = interleaved(arms, args.rounds)
        for handle in (bare, lora, attached):
            handle.close()
        loop.stop()
    ratio = ms["lora"] / ms["bare"]
    print_rows(
        f"adapter overhead (tiny model, 32 px, {args.steps} steps, median of {args.rounds})",
        [
            Row("engine, bare base model", ms["bare"]),
            Row(
                "engine, 1 cached LoRA (merged)",
                ms["lora"],
                baseline="engine bare",
                baseline_value=ms["bare"],
                target="<= 1.05x",
                ok=ratio <= 1.05,
            ),
            Row(
                "engine, base request, LoRA attached", ms["attached"], baseline="engine bare", baseline_value=ms["bare"]
            ),
            Row("diffusers, base", ms["diffusers base"]),
            Row(
                "diffusers, 1 LoRA unfused",
                ms["diffusers unfused"],
                baseline="diffusers base",
                baseline_value=ms["diffusers base"],
            ),
            Row(
                "diffusers, empty wrappers after delete",
                ms["diffusers empty wrappers"],
                baseline="diffusers base",
                baseline_value=ms["diffusers base"],
            ),
        ],
    )


TENANT_DEFAULT = "default"
_ = LORA_WEIGHTS_FILE

if __name__ == "__main__":
    main()
