"""`make demo`: the whole loop through the real gRPC services on the embedded default.

Installs the pretrained tiny base model into a fresh local registry, starts `atelier serve`
as a subprocess (real servers on loopback), and through the SDK trains one adapter of each
method plus a second LoRA, generates with each, with two LoRAs mixed and with none, writes
the PNGs and a contact sheet to demo-out/, prints a summary and shuts the services down.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from rich.console import Console
from rich.table import Table

from atelier.client import Client
from atelier.demo_images import concept_images, contact_sheet, save_all
from atelier.health import wait_until_serving
from atelier_api.v1 import training_pb2

console = Console()
BASE = "tiny-sd"


@dataclass
class TrainedAdapter:
    label: str
    method: str
    name: str
    version: int
    steps: int
    seconds: float
    size_bytes: int
    prompt: str
    token: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_env(state: Path) -> dict[str, str]:
    """Embedded-default settings rooted in the demo's own state folder."""
    return {
        **os.environ,
        "ATELIER_DATA_DIR": str(state),
        "ATELIER_REGISTRY_URL": f"file://{state / 'registry'}",
        "ATELIER_DATABASE_URL": f"sqlite:///{state / 'atelier.db'}",
        "ATELIER_CACHE_DIR": str(state / "cache"),
        "ATELIER_HOST": "127.0.0.1",
        "ATELIER_TRAINING_PORT": str(free_port()),
        "ATELIER_INFERENCE_PORT": str(free_port()),
        "ATELIER_METRICS_PORT": "0",
        "ATELIER_HTTP_PORT": "0",
        "ATELIER_AUTH_ENABLED": "false",
        "ATELIER_LOG_JSON": "false",
        "ATELIER_LOG_LEVEL": "WARNING",
        # One torch thread per process unless the user chose: the tiny model's ops are too small
        # to gain from more, and on 2 busy cores extra OpenMP threads made training ~10x slower.
        "ATELIER_TORCH_THREADS": os.environ.get("ATELIER_TORCH_THREADS", "1"),
    }


def atelier_cli() -> list[str]:
    return [sys.executable, "-m", "atelier.cli"]


def train(client: Client, label: str, method: str, dataset: str, steps: int, **options: Any) -> TrainedAdapter:
    started = time.monotonic()
    handle = client.train(method, base_model=BASE, dataset=dataset, name=label, max_train_steps=steps, seed=0,
                          **options)
    console.print(f"training {label} ({method}, {steps} steps) as job {handle.id}")
    job = handle.wait(timeout=1200)
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"{label} ended {training_pb2.JobState.Name(job.state)}: {job.error}")
    version = client.adapters.get(f"{job.output.name}@{job.output.version}").version
    prompt = str(options.get("instance_prompt", ""))
    return TrainedAdapter(label, method, job.output.name, job.output.version, job.step,
                          time.monotonic() - started, version.size_bytes, prompt,
                          str(options.get("placeholder_token", "")))


def run_demo(out: Path, quick: bool) -> None:
    """The demo itself; `quick` trains fewer steps (CI runs it that way)."""
    state = out / "state"
    shutil.rmtree(out, ignore_errors=True)
    state.mkdir(parents=True)
    env = demo_env(state)
    subprocess.run([*atelier_cli(), "base-model", "create-tiny", "--import", "--name", BASE,
                    "--out", str(state / "base-models" / BASE)], env=env, check=True)
    server = subprocess.Popen([*atelier_cli(), "serve"], env=env)
    try:
        training_target = f"127.0.0.1:{env['ATELIER_TRAINING_PORT']}"
        inference_target = f"127.0.0.1:{env['ATELIER_INFERENCE_PORT']}"
        wait_until_serving(training_target)
        wait_until_serving(inference_target)
        with Client(training_target, inference_target=inference_target, timeout=600) as client:
            exercise(client, out, quick)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    console.print(f"services stopped (exit {server.returncode}); pictures in {out}/")


def exercise(client: Client, out: Path, quick: bool) -> None:
    steps = 20 if quick else 150
    checker = save_all(concept_images(4, seed=1, pattern="checker"), out / "concept", "checker")
    stripes = save_all(concept_images(4, seed=2, pattern="stripes"), out / "concept", "stripes")
    checker_set = client.upload_dataset(checker, name="checker-disc").id
    stripes_set = client.upload_dataset(stripes, name="striped-disc").id
    trained = [
        train(client, "demo-lora", "lora", checker_set, steps, instance_prompt="a photo of sks disc", rank=4),
        train(client, "demo-lora-stripes", "lora", stripes_set, steps, instance_prompt="a photo of zwx disc",
              rank=4),
        train(client, "demo-dreambooth", "dreambooth", checker_set, steps, instance_prompt="a photo of sks disc"),
        train(client, "demo-ti", "textual-inversion", checker_set, steps, instance_prompt="a photo of <checker>",
              placeholder_token="<checker>", initializer_token="circle"),
    ]
    sheet: list[tuple[str, Image.Image]] = [("concept", Image.open(checker[0])), ("concept 2", Image.open(stripes[0]))]
    generations: list[tuple[str, str, list[str]]] = [("base", "a photo of a disc", [])]
    generations += [(a.label, a.prompt, [f"{a.name}@{a.version}=1.0"]) for a in trained]
    generations.append(("two LoRAs mixed", "a photo of sks zwx disc",
                        [f"{trained[0].name}@{trained[0].version}=0.7", f"{trained[1].name}@{trained[1].version}=0.7"]))
    for label, prompt, adapters in generations:
        result = client.generate(prompt, base_model=BASE, adapters=adapters, seed=7, steps=20)  # type: ignore[arg-type]
        path = out / f"{label.replace(' ', '-')}.png"
        result.images[0].save(path)
        sheet.append((label, result.images[0]))
    contact_sheet(sheet).save(out / "contact-sheet.png")
    summary(trained)


def summary(trained: list[TrainedAdapter]) -> None:
    table = Table(title="Atelier demo")
    for column in ("adapter", "method", "steps", "wall time", "adapter size", "version"):
        table.add_column(column)
    for adapter in trained:
        table.add_row(adapter.label, adapter.method, str(adapter.steps), f"{adapter.seconds:.1f} s",
                      f"{adapter.size_bytes / 1024:.1f} KiB", f"{adapter.name}@{adapter.version}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--quick", action="store_true", help="fewer training steps (CI)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    run_demo(args.out, args.quick)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
