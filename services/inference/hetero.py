"""Heterogeneous LoRA batching: one UNet forward, every sample with its own LoRA set and weights.

The merged path (lora.py) bakes one mix into the weights, so a batch mixing requests with
different LoRA sets would need one UNet evaluation per mix. Here the UNet's weights stay at the
base (restored, unmerged, shared by every row) and each adapted layer adds the low-rank delta
of the adapters each row asked for, as Punica / S-LoRA do for LLMs:

    out = base(x);  for each adapter n used in the batch:
        out[rows_n] += (w_row * scale_n) * B_n(A_n(x[rows_n]))

Linear layers (attention projections: the usual LoRA targets) take the stacked path: once per
batch, the batch's adapters of a layer are concatenated along the rank axis (`A = cat_i A_i`,
`B = cat_i B_i`, so mixed ranks need no padding) with a per-row coefficient mask over those
columns (weight x alpha/r where the row uses the adapter, exact zeros elsewhere), and a forward
costs two plain GEMMs, one multiply and one add per layer: `B((A x) * mask)`. Cost grows with
the batch's total rank (bounded: at most `device_cache_max_adapters` distinct adapters). Conv2d LoRA layers are
grouped per adapter instead: one gather, A, B and one `index_add` per adapter and layer. Rows of
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


def _stacked(layer: Any, plan: RowPlan, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's adapters of one layer stacked along the rank axis (A: R x in, B: out x R) and
    each row's coefficients over those R columns (total x R: weight x alpha/r, 0 elsewhere)."""
    weight = layer.get_base_layer().weight
    names = [n for n in plan if n in layer.lora_A]
    a_all = torch.cat([layer.lora_A[n].weight for n in names]).to(weight.dtype)
    b_all = torch.cat([layer.lora_B[n].weight for n in names], dim=1).to(weight.dtype)
    coef = torch.zeros(total, a_all.shape[0], dtype=weight.dtype, device=weight.device)
    offset = 0
    for name in names:
        r = layer.lora_A[name].weight.shape[0]
        rows, weights = plan[name]
        values = torch.tensor(weights, dtype=weight.dtype, device=weight.device) * float(layer.scaling[name])
        coef[torch.tensor(rows, device=weight.device), offset:offset + r] = values[:, None]
        offset += r
    return a_all, b_all, coef


def _stacked_hook(a_all: torch.Tensor, b_all: torch.Tensor, coef: torch.Tensor, fallback: Any) -> Any:
    def add_deltas(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.shape[0] != coef.shape[0]:
            return fallback(module, args, output)  # a forward over other rows: per adapter
        mask = coef.view(coef.shape[0], *([1] * (x.dim() - 2)), coef.shape[1])
        h = torch.nn.functional.linear(x if x.dtype == a_all.dtype else x.to(a_all.dtype), a_all).mul_(mask)
        delta = torch.nn.functional.linear(h, b_all)
        return output.add_(delta if delta.dtype == output.dtype else delta.to(output.dtype))  # inference only

    return add_deltas


def _hook(entries: Sequence[Entry]) -> Any:
    def add_deltas(_module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for lora_a, lora_b, rows, coef in entries:
            delta = lora_b(lora_a(x.index_select(0, rows)))
            scaled = delta * coef.view(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
            output = output.index_add(0, rows, scaled.to(output.dtype))
        return output

    return add_deltas


Hook = Any
"""A forward hook adding per-row deltas to one base layer's output."""


def delta_hooks(merger: LoraMerger, plan: RowPlan, total: int) -> list[tuple[torch.nn.Module, Hook]]:
    """The hooks for a batch of `total` rows (built once per batch composition: the continuous
    scheduler reuses them step after step while its running set is unchanged)."""
    hooks: list[tuple[torch.nn.Module, Hook]] = []
    for layer in merger.layers():
        entries: list[Entry] = []
        for name in (n for n in plan if n in layer.lora_A):
            layer.set_scale(name, 1.0)
            device = layer.get_base_layer().weight.device
            rows, weights = plan[name]
            coef = torch.tensor(weights, dtype=torch.float32, device=device) * float(layer.scaling[name])
            entries.append((layer.lora_A[name], layer.lora_B[name], torch.tensor(rows, device=device), coef))
        if entries and isinstance(layer, LoraLinear):
            hooks.append((layer.get_base_layer(), _stacked_hook(*_stacked(layer, plan, total), _hook(entries))))
        elif entries:
            hooks.append((layer.get_base_layer(), _hook(entries)))
    return hooks


@contextlib.contextmanager
def installed(hooks: Sequence[tuple[torch.nn.Module, Hook]]) -> Iterator[int]:
    """Register `hooks` for the duration of the block (yields how many)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def per_sample_deltas(merger: LoraMerger, plan: RowPlan, total: int) -> Iterator[int]:
    """Base weights in `merger`'s component plus per-row LoRA deltas for a batch of `total`
    rows (yields the hooked layer count)."""
    merger.apply(())  # restore the originals bit for bit, wrappers stripped
    with installed(delta_hooks(merger, plan, total)) as count:
        yield count
