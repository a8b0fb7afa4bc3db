"""GPU suite (one H100, < 8 min, nothing downloaded): training it/s, generation latency, switching.

Pipelines are SD 1.5- and SDXL-shaped with random weights built from the published configs
(written below), the project's own tokenizer, bf16 on CUDA. Timings do not depend on what the
weights are. Prints one table with ratios:

  training   LoRA it/s at 512 px SD1.5: Atelier's trainer vs the plain diffusers/peft loop
             (bench/train_throughput.py, each in its own process); 1024 px SDXL: plain peft loop
             only (Atelier's trainer is SD 1.x/2.x), UNet forward+backward on cached latents
  generate   30-step latency through the InferenceEngine: base, 1 LoRA, 3 mixed LoRAs, next to
             plain diffusers (unfused LoRA via set_adapters); SDXL at 1024 px: base and 1 LoRA
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
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from services.common.config import Settings
from services.inference.types import AdapterSpec, GenerationRequest
from services.registry.manifests import LORA_WEIGHTS_FILE
from services.registry.refs import AdapterRef
from services.registry.registry import Registry
from services.tinymodel.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tokenizer

# --- published shapes (SD 1.5: runwayml/stable-diffusion-v1-5; SDXL: stabilityai/sdxl-base-1.0) ---
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
# --cpu-smoke: the same code with tiny shapes
TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
TINY_XL_UNET = dict(TINY_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=80, transformer_layers_per_block=[1, 1])
TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32, hidden_act="quick_gelu")
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
ROWS: list[tuple[str, str, str]] = []


def row(name: str, value: str, ratio: str = "") -> None:
    ROWS.append((name, value, ratio))
    print(f"  {name:<58} {value:>14} {ratio}", flush=True)


def text_encoder(vocab: dict[str, int], config: dict[str, Any], projection: bool = False) -> torch.nn.Module:
    cfg = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=vocab[BOS],
                         eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], **config)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build(kind: str, tmp: Path, device: str, dtype: torch.dtype, smoke: bool) -> Any:
    """A random-weight SD1.5 ("sd15") or SDXL ("sdxl") pipeline, built directly on the device."""
    vocab = write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    torch.manual_seed(0)
    # Built outside the device context: under `torch.device("cuda")` its alphas_cumprod would be
    # a CUDA tensor, and EulerDiscreteScheduler.set_timesteps calls np.array() on it (TypeError).
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    with torch.device(device):  # models only: random init on the GPU takes seconds, not minutes
        if kind == "sd15":
            unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD15_UNET))
            vae = AutoencoderKL(**(TINY_VAE if smoke else VAE), scaling_factor=0.18215)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(vocab, TINY_CLIP if smoke else CLIP_L),
                                           tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        else:
            unet = UNet2DConditionModel(**(TINY_XL_UNET if smoke else SDXL_UNET))
            vae = AutoencoderKL(**(TINY_VAE if smoke else VAE), scaling_factor=0.13025, force_upcast=False)
            small = dict(TINY_CLIP, hidden_size=32) if smoke else CLIP_L
            big = dict(TINY_CLIP, hidden_size=32, projection_dim=32) if smoke else CLIP_G
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(vocab, small),
                                             text_encoder_2=text_encoder(vocab, big, projection=True),
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                             scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def random_lora(unet: torch.nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA on the attention projections, random non-zero A and B."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            out[f"unet.{name}.lora.down.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
            out[f"unet.{name}.lora.up.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
    return out


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
    loras = [random_lora(pipe.unet, 16, seed) for seed in range(8)]
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
    if kind == "sdxl":
        arms.pop("3 LoRAs")
    ours = {}
    for name, r in arms.items():
        handle.generate(r)  # warm: attach, merge, kernels
        ours[name] = median_ms(lambda r=r, h=handle: h.generate(r), reps, device)
    print(f"\n[{kind}] {size} px, {steps} steps, bf16 ({'CPU smoke' if smoke else device})")
    for name in arms:
        row(f"{kind} generate, engine, {name}", f"{ours[name]:.0f} ms",
            f"{ours[name] / ours['base']:.3f}x base" if name != "base" else "")
    row(f"{kind} peak GPU memory, engine", peak_gib(device), resident)
    if kind == "sd15":
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


def training(tmp: Path, args: argparse.Namespace) -> None:
    print("\n[training] SD1.5 512 px bf16: bench/train_throughput.py (ours vs diffusers/peft loop)", flush=True)
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--device", "cuda", "--model", "sd15",
           "--resolution", "512", "--precision", "bf16", "--batch", "1", "--steps", "30", "--warmup", "5"]
    # Own session: on timeout the whole group dies, so no orphaned child keeps the GPU busy
    # while the later phases are timed (subprocess.run's timeout kills the direct child only).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    print(out[-3000:])
    if proc.returncode != 0:
        print(f"train_throughput.py exited {proc.returncode}:\n{err[-3000:]}")
    train_rows(out)
    sdxl_training(args)


def train_rows(report: str) -> None:
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
        row("sd15 train (512 px, batch 1)", "FAILED", "see output above")
        return
    ref, ours = runs["reference"], runs["ours"]
    row("sd15 train, diffusers/peft reference loop (512 px, batch 1)", f"{ref[1]:.2f} it/s", "median step")
    row("sd15 train, Atelier run_training (512 px, batch 1)", f"{ours[1]:.2f} it/s",
        f"{ours[1] / ref[1]:.2f}x reference loop (median step)")
    row("sd15 train peak GPU memory, reference / ours", f"{ref[4] / 1024:.1f} / {ours[4] / 1024:.1f} GiB")


def sdxl_training(args: argparse.Namespace) -> None:
    """Plain peft LoRA loop on the SDXL UNet at 1024 px (latents 128x128), bf16 autocast."""
    from peft import LoraConfig, inject_adapter_in_model

    device, smoke = args.device, args.cpu_smoke
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_XL_UNET if smoke else SDXL_UNET)).requires_grad_(False)
    unet.to(dtype=torch.float32 if smoke else torch.bfloat16)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(TARGETS)),
                            unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    side, ctx, pooled = (8, 64, 32) if smoke else (128, 2048, 1280)

    def step() -> None:
        latents = torch.randn(1, 4, side, side, device=device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=not smoke):
            pred = unet(latents, torch.randint(0, 1000, (1,), device=device), torch.randn(1, 77, ctx, device=device),
                        added_cond_kwargs={"text_embeds": torch.randn(1, pooled, device=device),
                                           "time_ids": torch.randn(1, 6, device=device)}).sample
        loss = torch.nn.functional.mse_loss(pred.float(), latents)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()

    warm, timed = (1, 2) if smoke else (3, 15)
    for _ in range(warm):
        step()
    ms = median_ms(step, timed, device)
    row("sdxl train, plain peft loop (1024 px, batch 1)", f"{1000 / ms:.2f} it/s", "ours: n/a (SD 1.x/2.x trainer)")
    row("sdxl train peak GPU memory", peak_gib(device))


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
            if args.cpu_smoke:
                sdxl_training(args)
            else:
                training(tmp, args)
        for kind in ("sd15", "sdxl"):
            generation(kind, tmp / kind, args)
    print(f"\n== gpu suite summary ({time.perf_counter() - started:.0f} s) ==")
    for name, value, ratio in ROWS:
        print(f"{name:<58} {value:>14} {ratio}")


if __name__ == "__main__":
    main()
