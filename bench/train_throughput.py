"""LoRA training throughput and peak memory: Atelier's trainer vs the diffusers reference loop.

Both sides train the same LoRA (rank 4 on to_q/to_k/to_v/to_out.0, AdamW, constant lr, grad
clipping 1.0) on the same base model, images, batch size and resolution, each in its own
subprocess so peak RSS is per run. The reference is the `train_text_to_image_lora.py` recipe's
loop written out without accelerate: per step it preprocesses the batch (resize, crop, flip,
normalise), tokenises the captions, VAE-encodes and text-encodes, then trains. Ours is
`run_training`, which encodes each image view and prompt once.

    .venv/bin/python bench/train_throughput.py                 # tiny model, batch 4, 64 px, CPU
    .venv/bin/python bench/train_throughput.py --device cuda --model sd15 --resolution 512
    .venv/bin/python bench/train_throughput.py --model tiny-sdxl     # or tiny-flux; sdxl/flux on CUDA

SDXL and Flux are measured against bench/family_reference.py's loops (the diffusers SDXL/Flux
DreamBooth-LoRA recipes' steps) instead of the SD text-to-image recipe below.

Printed: steady-state steps/s (after --warmup steps), end-to-end seconds including model
loading and caching, peak RSS (and peak CUDA memory), and the ratios ours/reference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the parent imports `services` too, also when not pip-installed
    sys.path.insert(0, str(ROOT))
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
MODEL_FAMILY = {"tiny": "sd1", "sd15": "sd1", "tiny-sdxl": "sdxl", "sdxl": "sdxl", "tiny-flux": "flux", "flux": "flux"}
PROMPT = "a photo of sks toy"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _cuda_peak_mib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- the two contenders (each runs in a child process) ---------------------------------------
def run_ours(args: argparse.Namespace, images: list[Path]) -> dict[str, float]:
    from services.training.trainers import TrainConfig, TrainImage
    from services.training.trainers.engine import run_training

    stamps: list[float] = []

    class Clock:
        def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
            stamps.append(time.perf_counter())

        def should_stop(self) -> bool:
            return False

        def save_checkpoint(self, step: int, state_dir: Path) -> None:
            pass

        def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None) -> None:
            pass

    config = TrainConfig(
        method="LORA",
        base_model="bench",
        dataset_id="bench",
        output_name="bench",
        instance_prompt=PROMPT,
        rank=args.rank,
        alpha=float(args.rank),
        learning_rate=1e-4,
        max_train_steps=args.warmup + args.steps,
        train_batch_size=args.batch,
        resolution=args.resolution,
        seed=0,
        checkpointing_steps=10**6,
        mixed_precision=args.precision,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        run_training(
            config,
            base_model_dir=Path(args.base),
            images=[TrainImage(p) for p in images],
            work_dir=Path(work),
            callbacks=Clock(),
            device=args.device,
        )
    total = time.perf_counter() - start
    return _rates(stamps, args.warmup) | {"end_to_end_s": total}


def _reference_batch(paths: list[Path], indices: list[int], resolution: int, rng: Any) -> Any:
    """The recipe's per-sample transforms: Resize(short side), RandomCrop, ToTensor, Normalize."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for i in indices:
        img = Image.open(paths[i]).convert("RGB")
        w, h = img.size
        s = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BILINEAR)
        left = int(rng.integers(0, img.width - resolution + 1))
        top = int(rng.integers(0, img.height - resolution + 1))
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(out))


def run_family_reference(args: argparse.Namespace, images: list[Path]) -> dict[str, float]:
    """SDXL / Flux: the loop of bench/family_reference.py, with the same batches as below."""
    import numpy as np
    import torch
    from family_reference import reference_step_fn

    start = time.perf_counter()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(args), torch.float32)
    step = reference_step_fn(args.family, Path(args.base), dev, dtype, args.rank, PROMPT)
    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(args.warmup + args.steps):
        indices = [int(i) for i in rng.integers(0, len(images), args.batch)]
        step(_reference_batch(images, indices, args.resolution, rng).to(dev, dtype))
        stamps.append(time.perf_counter())
    return _rates(stamps, args.warmup) | {"end_to_end_s": time.perf_counter() - start}


def run_reference(args: argparse.Namespace, images: list[Path]) -> dict[str, float]:
    if args.family != "sd1":
        return run_family_reference(args, images)
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTokenizer

    start = time.perf_counter()
    base, dev = Path(args.base), torch.device(args.device)
    torch.manual_seed(0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_precision(args), torch.float32)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").requires_grad_(False).to(dev, dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").requires_grad_(False).to(dev, dtype)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").requires_grad_(False).to(dev, dtype)
    inject_adapter_in_model(
        LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS), unet
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    rng = np.random.default_rng(0)
    unet.train()
    stamps = []
    for _ in range(args.warmup + args.steps):
        indices = [int(i) for i in rng.integers(0, len(images), args.batch)]
        pixels = _reference_batch(images, indices, args.resolution, rng).to(dev, dtype)
        ids = tokenizer(
            [PROMPT] * args.batch,
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids.to(dev)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            hidden = text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), device=dev)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with autocast:
            pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        loss.item()  # the recipe logs the loss every step
        stamps.append(time.perf_counter())
    total = time.perf_counter() - start
    return _rates(stamps, args.warmup) | {"end_to_end_s": total}


def _rates(stamps: list[float], warmup: int) -> dict[str, float]:
    """Mean rate over the timed steps, and the rate of the median step (robust to CPU contention)."""
    durations = [b - a for a, b in itertools.pairwise(stamps[warmup - 1 :])]
    return {
        "steps_per_s": len(durations) / (stamps[-1] - stamps[warmup - 1]),
        "median_steps_per_s": 1.0 / statistics.median(durations),
    }


def _precision(args: argparse.Namespace) -> str:
    if not args.device.startswith("cuda"):
        return "no"
    import torch

    if args.precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return str(args.precision)


def _import_both_stacks() -> None:
    """Import what either side uses before its clock starts, so end-to-end times exclude imports.

    diffusers and transformers import their model modules lazily; without this the first run to
    touch `StableDiffusionPipeline` or peft's LoRA layers would be charged a few seconds of imports.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from peft.tuners.lora import Linear  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import services.training.trainers.engine  # noqa: F401


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _import_both_stacks()
    images = [Path(p) for p in json.loads(args.images)]
    result = (run_ours if args.child == "ours" else run_reference)(args, images)
    _sync(args.device)
    result.update(peak_rss_mib=_peak_rss_mib(), peak_cuda_mib=_cuda_peak_mib(args.device))
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: prepare inputs, run both children, print ratios ------------------------------
def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, list[Path]]:
    from services.tinymodel.synthetic import make_concept_images

    base = Path(args.base) if args.base else _build_base(args.model, tmp / "base")
    paths = []
    for i, img in enumerate(make_concept_images(args.images, seed=0, size=args.resolution)):
        paths.append(tmp / f"img{i}.png")
        img.save(paths[-1])
    return base, paths


def _build_base(model: str, out: Path) -> Path:
    from services.tinymodel.families import build_tiny_family

    if model == "tiny":
        return build_tiny_family("sd1", out, seed=0)
    if model.startswith("tiny-"):
        return build_tiny_family(MODEL_FAMILY[model], out, seed=0)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if model == "sd15":
        from sd15_shapes import build_sd15_random  # full-size SD 1.5 shapes, random weights

        return build_sd15_random(out)
    from gpu_shapes import save_random  # SDXL / Flux-shaped, random weights, built on the GPU

    return save_random(model, out)


def run_child(which: str, args: argparse.Namespace, base: Path, images: list[Path]) -> dict[str, float]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        which,
        "--base",
        str(base),
        "--images",
        json.dumps([str(p) for p in images]),
    ]
    for key in ("steps", "warmup", "batch", "resolution", "rank", "device", "threads", "precision", "model"):
        cmd += [f"--{key}", str(getattr(args, key))]
    paths = [str(ROOT), str(ROOT / "clients/python"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{which} run failed with exit code {proc.returncode}")
    return dict(json.loads(lines[-1][len("RESULT ") :]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--images", default="4", help="image count (parent) / JSON list of paths (child)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--model", default="tiny", choices=sorted(MODEL_FAMILY))
    p.add_argument("--base", default="", help="an existing diffusers SD folder instead of building one")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times")
    p.add_argument("--child", choices=["ours", "reference"])
    args = p.parse_args()
    args.family = MODEL_FAMILY[args.model]
    if args.child:
        child(args)
        return
    args.images = int(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        base, images = prepare(args, Path(tmp))
        runs: dict[str, list[dict[str, float]]] = {"reference": [], "ours": []}
        for _ in range(args.repeats):
            for which in ("reference", "ours"):
                runs[which].append(run_child(which, args, base, images))
    report(args, runs)


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> None:
    """Best run of each side (runs alternate, so drifting load hits both alike)."""
    best = {k: max(v, key=lambda r: r["median_steps_per_s"]) for k, v in runs.items()}
    print(
        f"LoRA rank {args.rank}, batch {args.batch}, {args.resolution} px, model {args.model}, "
        f"device {args.device}, threads {args.threads}, {args.steps} timed steps after {args.warmup}, "
        f"best of {args.repeats}"
    )
    print(f"{'run':<10} {'steps/s':>8} {'median':>8} {'end-to-end s':>13} {'peak RSS MiB':>13} {'peak CUDA MiB':>14}")
    for name in ("reference", "ours"):
        r = best[name]
        print(
            f"{name:<10} {r['steps_per_s']:>8.2f} {r['median_steps_per_s']:>8.2f} {r['end_to_end_s']:>13.1f} "
            f"{r['peak_rss_mib']:>13.0f} {r['peak_cuda_mib']:>14.0f}"
        )
    ref, ours = best["reference"], best["ours"]
    ratio = ours["median_steps_per_s"] / ref["median_steps_per_s"]
    print(f"throughput ratio ours/reference (median step): {ratio:.2f}x (target >= 1.3x)")
    print(f"throughput ratio ours/reference (mean):        {ours['steps_per_s'] / ref['steps_per_s']:.2f}x")
    print(f"end-to-end ratio reference/ours:               {ref['end_to_end_s'] / ours['end_to_end_s']:.2f}x")
    print(f"peak RSS ratio ours/reference:                 {ours['peak_rss_mib'] / ref['peak_rss_mib']:.2f}")
    if args.device.startswith("cuda"):
        print(f"peak CUDA ratio ours/reference:                {ours['peak_cuda_mib'] / ref['peak_cuda_mib']:.2f}")


if __name__ == "__main__":
    main()
