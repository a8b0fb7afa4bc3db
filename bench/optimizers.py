"""Optimizer comparison: steady-state steps/s and final loss per optimizer, as ratios vs AdamW.

Every arm trains the same LoRA (rank 4, UNet attention projections) on the same synthetic
concept images, seed, batch size and resolution of the tiny pretrained base, through the
public trainer entry point (`run_training`), in one process. Arms are interleaved in rounds
(AdamW, Prodigy, Adafactor, AdamW, ...) and steps/s is the median over rounds, so machine
load hits every arm alike. The loss compared is the trainer's fixed-noise denoising loss on
the training images after the last step (`eval_loss_final`, deterministic for a seed), next
to the mean of the last 10 step losses. 8-bit AdamW joins only on CUDA with bitsandbytes.

    .venv/bin/python bench/optimizers.py                  # CPU, 60 steps, 2 rounds
    .venv/bin/python bench/optimizers.py --device cuda --steps 200
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from services.training.trainers import TrainConfig, TrainImage  # noqa: E402
from services.training.trainers.choices import Optimizer  # noqa: E402
from services.training.trainers.engine import run_training  # noqa: E402

BASELINE = "adamw"
# the LoRA recipe rate; Prodigy's own 1.0
LEARNING_RATES: dict[Optimizer, float] = {"adamw": 1e-4, "adamw_8bit": 1e-4, "adafactor": 1e-4, "prodigy": 1.0}


class Clock:
    """Trainer callbacks that only time the steps."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # loss.item() already waited on the step; this is cheap
        self.stamps.append(time.perf_counter())

    def should_stop(self) -> bool:
        return False

    def save_checkpoint(self, step: int, state_dir: Path) -> None:
        pass

    def on_validation(self, step: int, images: list[tuple[str, bytes]], loss: float | None = None) -> None:
        pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def optimizers(device: str) -> list[Optimizer]:
    names: list[Optimizer] = ["adamw", "prodigy", "adafactor"]
    if device.startswith("cuda"):
        try:
            import bitsandbytes  # type: ignore[import-not-found]  # noqa: F401

            names.append("adamw_8bit")
        except ImportError:
            print("adamw_8bit skipped: bitsandbytes is not installed", flush=True)
    else:
        print("adamw_8bit skipped: needs a CUDA device", flush=True)
    return names


def run_arm(
    name: Optimizer, args: argparse.Namespace, base: Path, images: list[TrainImage], work: Path
) -> dict[str, float]:
    config = TrainConfig(
        method="LORA", base_model="bench", dataset_id="bench", output_name="bench",
        instance_prompt="a photo of sks toy", optimizer=name, learning_rate=args.lr or LEARNING_RATES[name],
        lr_scheduler=args.scheduler, lr_warmup_steps=args.warmup, max_train_steps=args.steps,
        train_batch_size=args.batch, checkpointing_steps=10**6, seed=0, rank=4, alpha=4.0, resolution=None,
    )  # fmt: skip
    clock = Clock()
    result = run_training(config, base_model_dir=base, images=images, work_dir=work, callbacks=clock,
                          device=args.device)
    steady = clock.stamps[args.warmup_steps:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    return {"steps_per_second": rate, "eval_loss_final": result.metrics["eval_loss_final"],
            "eval_loss_initial": result.metrics["eval_loss_initial"],
            "mean_loss_last_10": result.metrics["mean_loss_last_10"], "resolution": result.metrics["resolution"]}


def optimizer_step_ms(names: list[Optimizer], shapes: list[tuple[int, ...]], args: argparse.Namespace,
                      rounds: int = 40) -> dict[str, float]:
    """Median ms of one optimizer.step() over LoRA-shaped tensors, arms interleaved per round.

    Short interleaved samples keep the comparison fair on a machine whose load changes over
    the seconds a full training arm takes.
    """
    from services.training.trainers.optim import build_optimizer

    gen = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    params = {}
    for name in names:
        params[name] = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
        for prm in params[name]:
            prm.grad = torch.randn(prm.shape, generator=gen).to(device) * 1e-3
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        for name in names:  # a fresh optimizer per sample: fixed grads would make Prodigy's d overflow
            config = TrainConfig(method="LORA", base_model="b", dataset_id="d", output_name="o",
                                 instance_prompt="p", optimizer=name, resolution=None)
            with contextlib.redirect_stdout(io.StringIO()):  # Prodigy prints a line per construction
                opt = build_optimizer(config, [{"params": params[name], "lr": LEARNING_RATES[name]}], device)
            opt.step()  # allocates the state; not timed
            _sync(args.device)
            start = time.perf_counter()
            for _ in range(5):
                opt.step()
            _sync(args.device)
            samples[name].append((time.perf_counter() - start) / 5 * 1000)
    return {n: statistics.median(v) for n, v in samples.items()}


def table(results: dict[str, list[dict[str, float]]], step_ms: dict[str, float]) -> None:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    base = med[BASELINE]
    print(f"\n{'optimizer':<11} {'steps/s':>8} {'x AdamW':>8} {'opt.step ms':>11} {'x AdamW':>8} "
          f"{'eval loss':>10} {'x AdamW':>8} {'last-10 loss':>13} {'start loss':>10}")
    for name, m in med.items():
        print(f"{name:<11} {m['steps_per_second']:8.2f} {m['steps_per_second'] / base['steps_per_second']:8.3f} "
              f"{step_ms[name]:11.2f} {step_ms[name] / step_ms[BASELINE]:8.3f} "
              f"{m['eval_loss_final']:10.5f} {m['eval_loss_final'] / base['eval_loss_final']:8.3f} "
              f"{m['mean_loss_last_10']:13.5f} {m['eval_loss_initial']:10.5f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of steps/s")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.0, help="one rate for all (default: per optimizer)")
    parser.add_argument("--scheduler", default="constant")
    parser.add_argument("--warmup", type=int, default=0, help="lr warm-up steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from services.tinymodel.install import install_pretrained
    from services.tinymodel.synthetic import make_concept_images

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = install_pretrained(tmp / "tiny-sd")
        images = []
        for i, img in enumerate(make_concept_images(args.images, seed=0, size=64)):
            img.save(tmp / f"{i}.png")
            images.append(TrainImage(tmp / f"{i}.png"))
        names = optimizers(args.device)
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rnd in range(args.rounds):
            for name in names:
                results[name].append(run_arm(name, args, base, images, tmp / f"w-{name}-{rnd}"))
                print(f"round {rnd + 1} {name}: {results[name][-1]}", flush=True)
        px = int(results[BASELINE][0]["resolution"])
        print(f"\nLoRA rank 4, tiny pretrained base at {px} px, batch {args.batch}, {args.steps} steps, "
              f"device {args.device}; "
              f"lr {args.lr or 'per optimizer ' + str(LEARNING_RATES)}; median of {args.rounds} rounds")
        weights = load_file(str(tmp / f"w-{BASELINE}-0" / "artifact" / "pytorch_lora_weights.safetensors"))
        shapes = [tuple(t.shape) for t in weights.values()]
        print(f"optimizer.step() timed alone over the {len(shapes)} LoRA tensors, 40 interleaved rounds of 5")
        table(results, optimizer_step_ms(names, shapes, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
