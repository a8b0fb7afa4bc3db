"""Model loads in two threads of one process (the embedded `atelier serve`: a worker starting a
job while inference attaches a LoRA) must not see each other's torch patches; without
services/common/model_loading.py most training loads failed with meta tensors or
`_is_hf_initialized` TypeErrors."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from services.inference.lora import load_lora
from services.training.trainers.models import load_components
from tests.fixtures.synthetic import LoraFactory

LOADS = 4


@pytest.mark.timeout(300)
def test_training_loads_beside_lora_attaches_in_another_thread(tiny_random_pipeline_dir: Path,
                                                               tmp_path: Path) -> None:
    lora = load_file(str(LoraFactory(tiny_random_pipeline_dir).write(tmp_path / "lora", seed=1)))
    pipe = DiffusionPipeline.from_pretrained(tiny_random_pipeline_dir)
    done = threading.Event()
    errors: list[str] = []
    attached = [0]

    def attach_loop() -> None:
        while not done.is_set():
            name = f"a{attached[0]}"
            try:
                load_lora(pipe, name, dict(lora), None)
                pipe.delete_adapters(name)
            except Exception as exc:
                errors.append(f"attach: {type(exc).__name__}: {exc}")
            attached[0] += 1

    thread = threading.Thread(target=attach_loop, daemon=True)
    thread.start()
    try:
        for _ in range(LOADS):
            try:
                comps = load_components(tiny_random_pipeline_dir, "cpu", "no")
            except Exception as exc:
                errors.append(f"load: {type(exc).__name__}: {exc}")
                continue
            meta = [n for module in (comps.unet, comps.text_encoder, comps.vae)
                    for n, p in module.named_parameters() if p.is_meta]
            if meta:
                errors.append(f"load: meta parameters {meta[:3]}")
    finally:
        done.set()
        thread.join(60)
    assert errors == [] and attached[0] > 0


@pytest.mark.timeout(300)
def test_raw_library_loads_in_two_threads_leave_torch_unpatched(tiny_random_pipeline_dir: Path) -> None:
    """Loads that bypass our call sites (plain diffusers/transformers calls) take the lock too, so
    overlapping save/patch/restore of torch globals can never leave `register_parameter` patched."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    original = torch.nn.Module.register_parameter
    errors: list[str] = []

    def load(kind: str) -> None:
        for _ in range(LOADS):
            try:
                if kind == "unet":
                    model = UNet2DConditionModel.from_pretrained(tiny_random_pipeline_dir / "unet")
                else:
                    model = CLIPTextModel.from_pretrained(tiny_random_pipeline_dir / "text_encoder")
                if any(p.is_meta for p in model.parameters()):
                    errors.append(f"{kind}: meta parameters")
            except Exception as exc:
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=load, args=(kind,)) for kind in ("unet", "text", "unet", "text")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert torch.nn.Module.register_parameter is original
    assert getattr(UNet2DConditionModel.from_pretrained.__func__, "__atelier_locked__", False)
