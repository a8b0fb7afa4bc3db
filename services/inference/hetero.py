"""Heterogeneous LoRA batching: one UNet forward, every sample with its own LoRA set and weights.

The merged path (lora.py) bakes one mix into the weights, so a batch mixing requests with
different LoRA sets would need one UNet evaluation per mix. Here the UNet's weights stay at the
base (restored, unmerged, shared by every row) and each adapted layer adds the low-rank delta
of the adapters each row asked for, as Punica / S-LoRA do for LLMs:

    out = base(x);  for each adapter n used in the batch:
        out[rows_n] += (w_row * scale_n) * B_n(A_n(x[rows_n]))

Work is grouped per adapter, not per request: one gather, two small matmuls (A then B, so an
adapter's rank only changes its own matmul: mixed ranks need no padding) and one `index_add`
per adapter and layer, whatever the number of requests using it with whatever weights. Rows of
one request include both classifier-free-guidance halves, so CFG rides along. Text encoders are
not handled here: prompts are encoded per request anyway, so the runner merges each request's
mix into the (small) text encoders before encoding it.

Numerics: `W x + s B (A x)` is not `(W + s B A) x` bit for bit, and the UNet runs on the whole
batch (other kernel blockings than batch 1), so a hetero-batched image equals its solo image
within a tolerance (documented and tested: CPU fp32, max 2 levels of 255), not byte for byte.
Only plain peft Linear/Conv2d LoRA layers qualify (no DoRA); `supported()` says when.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.lora import Conv2d as LoraConv2d
from peft.tuners.lora import Linear as LoraLinear

from services.inference.lora import LoraMerger, Mix

RowPlan = dict[str, tuple[list[int], list[float]]]
"""peft adapter name -> (batch rows using it, the weight each of those rows gives it)."""


def row_plan(groups: Sequence[Sequence[int]], mixes: Sequence[Mix]) -> RowPlan:
    """Which rows use which adapter with which weight; zero weights drop out (as in merging)."""
    plan: RowPlan = {}
    for rows, mix in zip(groups, mixes, strict=True):
        for name, weight in mix:
            if weight != 0.0:
                entry = plan.setdefault(name, ([], []))
                entry[0].extend(rows)
                entry[1].extend([weight] * len(rows))
    return plan


def supported(mergers: Sequence[LoraMerger], names: set[str]) -> bool:
    """True when every layer carrying one of `names` is a plain Linear/Conv2d LoRA (no DoRA)."""
    for merger in mergers:
        for layer in merger.layers():
            for name in names & set(layer.lora_A):
                if not isinstance(layer, LoraLinear | LoraConv2d) or layer.use_dora.get(name, False):
                    return False
                if isinstance(layer, LoraLinear) and getattr(layer, "fan_in_fan_out", False):
                    return False
    return True


Entry = tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]


def _hook(entries: Sequence[Entry]) -> Any:
    def add_deltas(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for lora_a, lora_b, rows, coef in entries:
            delta = lora_b(lora_a(x.index_select(0, rows)))
            scaled = delta * coef.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            output = output.index_add(0, rows, scaled.to(output.dtype))
        return output

    return add_deltas


@contextlib.contextmanager
def per_sample_deltas(merger: LoraMerger, plan: RowPlan) -> Iterator[int]:
    """Base weights in `merger`'s component plus per-row LoRA deltas (yields the hooked layer count)."""
    merger.apply(())  # restore the originals bit for bit, wrappers stripped
    handles = []
    for layer in merger.layers():
        entries: list[Entry] = []
        for name in (n for n in plan if n in layer.lora_A):
            layer.set_scale(name, 1.0)
            device = layer.get_base_layer().weight.device
            rows, weights = plan[name]
            coef = torch.tensor(weights, dtype=torch.float32, device=device) * float(layer.scaling[name])
            entries.append((layer.lora_A[name], layer.lora_B[name], torch.tensor(rows, device=device), coef))
        if entries:
            handles.append(layer.get_base_layer().register_forward_hook(_hook(entries)))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
