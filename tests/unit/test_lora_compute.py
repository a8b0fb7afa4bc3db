"""Merged-weight LoRA compute: the same function and gradients as peft's path, only where safe."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from services.tinymodel.pipeline import make_unet
from services.training.trainers.lora_compute import merge_pays_off, use_merged_compute

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


class Block(torch.nn.Module):
    def __init__(self, width: int = 32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(width, width, dtype=dtype)
        self.to_k = torch.nn.Linear(width, width // 2, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_q(x).sum(-1) + self.to_k(x).sum(-1)


def _lora(model: torch.nn.Module, targets: list[str], dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=targets),
        model,
    )
    with torch.no_grad():  # B starts at zero; give it values so the LoRA path contributes
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def _lora_grads(model: torch.nn.Module, run: torch.Tensor) -> dict[str, torch.Tensor]:
    run.sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_merged_unet_matches_peft_outputs_and_gradients() -> None:
    torch.manual_seed(0)  # the UNet's own init, independent of test order
    reference = _lora(make_unet(), TARGETS)
    merged = copy.deepcopy(reference)
    assert use_merged_compute(merged) == 56  # every attention projection of the tiny UNet
    torch.manual_seed(1)
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 77, 64))
    ref_out, out = reference(*args).sample, merged(*args).sample
    # Float32 rounding differs (the update is added to W before the GEMM), nothing more: a wrong
    # scale, a missing bias or a dropped adapter shows up as an error of order 1e-2 or more.
    assert (out - ref_out).norm() / ref_out.norm() < 1e-4
    ref_grads, grads = _lora_grads(reference, ref_out), _lora_grads(merged, out)
    assert ref_grads.keys() == grads.keys() and len(grads) == 112
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).norm() / ref_grads[name].norm() < 1e-3, name


@pytest.mark.parametrize(
    ("width", "dtype", "dropout"),
    [(32, torch.float32, 0.1), (32, torch.bfloat16, 0.0), (1024, torch.float32, 0.0)],
    ids=["lora-dropout", "half-precision-weights", "large-layer"],
)
def test_layers_where_merging_is_not_the_same_or_not_cheaper_keep_peft(
    width: int, dtype: torch.dtype, dropout: float
) -> None:
    assert use_merged_compute(_lora(Block(width, dtype), ["to_q", "to_k"], dropout)) == 0


def test_size_rule_keeps_sd15_layers_on_the_rank_r_path() -> None:
    assert merge_pays_off(32, 32, 4) and merge_pays_off(128, 128, 4) and merge_pays_off(64, 32, 4)
    assert not merge_pays_off(320, 320, 4) and not merge_pays_off(768, 320, 4)


def test_autocast_and_disabled_adapters_fall_back_to_peft() -> None:
    reference = _lora(Block(), ["to_q", "to_k"])
    merged = copy.deepcopy(reference)
    assert use_merged_compute(merged) == 2
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(merged(x), reference(x))  # same low-precision path, bit for bit
    for model in (reference, merged):
        for module in model.modules():
            if hasattr(module, "enable_adapters"):
                module.enable_adapters(False)
    base = Block()
    base.load_state_dict({k.replace("base_layer.", ""): v for k, v in merged.state_dict().items() if "lora" not in k})
    torch.testing.assert_close(merged(x), base(x))
    torch.testing.assert_close(merged(x), reference(x))
