"""gRPC overhead: Generate over loopback vs a direct pipeline call (target <= 1.05x).

Arms, interleaved (tiny model, 32 px, 20 steps, one LoRA, CPU, one torch thread):
  grpc          InferenceService.Generate through a real server on 127.0.0.1 (all interceptors)
  engine        the same engine's generate() called on its own event loop (no gRPC)
  pipeline      plain diffusers: the same pipeline call with the LoRA fused, plus PNG encoding

    .venv/bin/python bench/grpc_overhead.py [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    TENANT,
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

from atelier_api.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from services.inference.engine import InferenceEngine
from services.inference.servicer import inference_bindings
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from tests.fixtures.grpc_servers import ServerThread, loopback_settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    setup_torch()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pipeline_dir = tiny_pipeline(tmp)
        settings = settings_for(tmp, pipeline_dir, "grpc")
        settings = loopback_settings(**settings.model_dump(exclude={"host", "auth_enabled", "api_keys",
                                                                    "api_keys_file", "tls_cert_file",
                                                                    "tls_key_file", "metrics_port"}))
        registry = Registry.from_settings(settings)
        publish_loras(registry, pipeline_dir, tmp, ["style"])
        holder: dict[str, InferenceEngine] = {}

        def bindings() -> list[Any]:
            holder["engine"] = InferenceEngine(settings, registry)
            return inference_bindings(holder["engine"])

        with ServerThread(settings, bindings) as server:
            stub = inference_pb2_grpc.InferenceServiceStub(server.channel())
            engine = holder["engine"]
            spec = inference_pb2.GenerationSpec(
                base_model="tiny", prompt="a red box on a blue floor", steps=args.steps, width=32, height=32,
                seed=1, adapters=[inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name="style"), weight=1.0)])
            req = request([("style", 1.0)], steps=args.steps)
            pipe = plain_pipeline(pipeline_dir, registry, tmp)

            def direct() -> bytes:
                with torch.no_grad():
                    image = pipe("a red box on a blue floor", num_inference_steps=args.steps, height=32, width=32,
                                 generator=torch.Generator().manual_seed(1)).images[0]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                return buffer.getvalue()

            arms = {
                "grpc": lambda: stub.Generate(inference_pb2.GenerateRequest(spec=spec), timeout=120),
                "engine": lambda: server.run(engine.generate(TENANT, req)),
                "pipeline": direct,
            }
            for fn in arms.values():
                fn()
                fn()
            same = stub.Generate(inference_pb2.GenerateRequest(spec=spec)).images[0].png == direct()
            ms = interleaved(arms, args.rounds)
            server.run(engine.close())
    print_rows(f"gRPC overhead (tiny model, 32 px, {args.steps} steps, 1 LoRA, median of {args.rounds})", [
        Row("direct pipeline call (+PNG)", ms["pipeline"]),
        Row("engine.generate, no gRPC", ms["engine"], baseline="pipeline", baseline_value=ms["pipeline"]),
        Row("Generate over loopback gRPC", ms["grpc"], baseline="pipeline", baseline_value=ms["pipeline"],
            target="<= 1.05x", ok=ms["grpc"] <= 1.05 * ms["pipeline"]),
        Row("Generate over loopback gRPC", ms["grpc"], baseline="engine", baseline_value=ms["engine"]),
    ])
    print(f"same PNG bytes from gRPC and the direct call: {same}")


def plain_pipeline(pipeline_dir: Path, registry: Registry, tmp: Path) -> StableDiffusionPipeline:
    record = registry.adapters.resolve(AdapterRef(TENANT, "style")).files[0]
    local = registry.blobs.download(record.sha256, tmp / "direct" / "pytorch_lora_weights.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(local.parent), adapter_name="style")
    pipe.set_adapters(["style"], [1.0])
    pipe.fuse_lora(adapter_names=["style"])
    pipe.unload_lora_weights()  # keep the fused weights, drop the wrappers: a plain fast pipeline
    return pipe


if __name__ == "__main__":
    main()
