"""Merged-weight LoRA compute for small float32 layers while training.

peft applies a LoRA layer as `base(x) + B(A(dropout(x))) * scale`: three GEMMs forward and
five backward over every token, plus elementwise passes for the scale and the sum. For a
layer whose weight is small next to its token count, `F.linear(x, W + scale * B @ A)` is the
same function with one GEMM forward and two backward (autograd turns the weight gradient into
dA = scale * B^T dW and dB = scale * dW A^T, both tiny). Measured on this 2-core CPU with
rank 4 (bench notes in docs/architecture.md): 0.34x the time of peft's path at 32x32 over
16k tokens, 0.65x at 128x128, 0.90-0.96x at 320x320, and slower from 640x640 on, where the
extra in x out weight-gradient GEMM costs more than the rank-r path saves. Hence the size
rule below; SD 1.5's layers (in x out / (r (in + out)) >= 40) keep peft's path.

Only used when it is exactly the same function: float32 weights with no autocast (a
half-precision W would round away the small update), no LoRA dropout, no DoRA or LoRA bias,
one active adapter. The parameters are peft's own, so saving, checkpoints and resume are
unchanged; a layer whose adapter is disabled or merged falls back to peft's forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as LoraLinear

MERGE_FACTOR = 32  # merge while in*out <= MERGE_FACTOR * r * (in + out)


def merge_pays_off(in_features: int, out_features: int, rank: int) -> bool:
    """True when materialising W + sBA is cheaper than applying the rank-r path per token."""
    return in_features * out_features <= MERGE_FACTOR * rank * (in_features + out_features)


def _eligible(layer: LoraLinear, adapter: str) -> bool:
    base = layer.base_layer
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    return (
        isinstance(base, torch.nn.Linear)
        and not layer.fan_in_fan_out
        and base.weight.dtype == torch.float32
        and lora_a.weight.dtype == torch.float32
        and isinstance(layer.lora_dropout[adapter], torch.nn.Identity)
        and adapter not in layer.lora_variant  # DoRA and other variants
        and lora_b.bias is None
        and merge_pays_off(base.in_features, base.out_features, lora_a.out_features)
    )


def _merged_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to a peft `lora.Linear` (typed Any: nn.Module attributes are opaque to mypy)."""
    adapter = self._atelier_merged_adapter
    if (
        self.disable_adapters
        or self.merged
        or args
        or kwargs
        or list(self.active_adapters) != [adapter]
        or torch.is_autocast_enabled(x.device.type)
    ):
        return LoraLinear.forward(self, x, *args, **kwargs)
    base = self.base_layer
    weight = torch.addmm(
        base.weight, self.lora_B[adapter].weight, self.lora_A[adapter].weight, alpha=self.scaling[adapter]
    )
    return F.linear(x, weight, base.bias)


def use_merged_compute(model: torch.nn.Module, adapter: str = "default") -> int:
    """Switch every eligible peft LoRA Linear of `model` to the merged forward; returns the count."""
    switched = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and adapter in module.lora_A and _eligible(module, adapter):
            layer: Any = module
            layer._atelier_merged_adapter = adapter
            layer.forward = types.MethodType(_merged_forward, layer)
            switched += 1
    return switched
