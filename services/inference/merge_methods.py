"""TIES and DARE: combining a request's LoRA deltas per layer beyond the weighted sum.

The definitions are peft's (`peft.utils.merge_utils`, used by `add_weighted_adapter`) and
LoRAX's, applied to each adapted layer's full delta `delta_i = B_i @ A_i * scale_i` with the
request's weights `w_i`:

* ties: keep each delta's `density` fraction of entries with the largest magnitude (top-k,
  k = int(density * numel)); per entry the elected sign is the sign of the sum of the pruned
  (unweighted) deltas, >= 0 counting as +; the result is sum of w_i * pruned_i over the deltas
  whose sign agrees, divided by how many agree (at least 1).
* dare_linear: keep each entry with probability `density` (Bernoulli), divide kept entries by
  density, then the weighted sum.
* dare_ties: DARE's drop and rescale, then TIES' sign election and disjoint mean.

The merged delta is no longer low rank, so the caller adds it to the base weight in full.

DARE's drop must be reproducible per request (the same request and seed give the same
image), so it never uses torch's global generator: every layer draws its masks from its own
CPU generator seeded with `layer_seed(seed, layer path)`, one Bernoulli draw per adapter in
request order, on CPU whatever the device (a seed means the same mask everywhere).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LINEAR = "linear"
TIES = "ties"
DARE_LINEAR = "dare_linear"
DARE_TIES = "dare_ties"
METHODS = (LINEAR, TIES, DARE_LINEAR, DARE_TIES)


@dataclass(frozen=True)
class MergeSpec:
    """How a request combines its LoRAs. LINEAR ignores density and seed (normalised away)."""

    method: str = LINEAR
    density: float = 1.0
    seed: int = 0

    def normalised(self) -> MergeSpec:
        """LINEAR compares equal whatever density/seed said; TIES has no randomness."""
        if self.method == LINEAR:
            return LINEAR_MERGE
        if self.method == TIES:
            return MergeSpec(TIES, self.density, 0)
        return self


LINEAR_MERGE = MergeSpec()


def layer_seed(seed: int, path: str) -> int:
    """The DARE generator seed of one layer: a stable hash of (request seed, layer path)."""
    digest = hashlib.sha256(f"{seed}/{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are < 2**63


def _magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    k = int(density * delta.numel())
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def _random_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return delta
    keep = torch.full(delta.shape, density, dtype=delta.dtype)
    mask = torch.bernoulli(keep, generator=generator).to(delta.device)
    return delta * mask / density


def _disjoint_mean(pruned: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    sign = pruned.sign()
    majority = torch.where(pruned.sum(dim=0) >= 0, 1, -1)
    agree = sign == majority
    weighted = pruned * weights.view(-1, *([1] * (pruned.dim() - 1)))
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def merge_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], spec: MergeSpec,
                 path: str) -> torch.Tensor:
    """One layer's merged delta for `spec` (any method but LINEAR, which peft merges itself)."""
    w = torch.tensor(list(weights), dtype=deltas[0].dtype, device=deltas[0].device)
    if spec.method == TIES:
        return _disjoint_mean(torch.stack([_magnitude_prune(d, spec.density) for d in deltas]), w)
    generator = torch.Generator("cpu").manual_seed(layer_seed(spec.seed, path))
    dropped = torch.stack([_random_prune(d, spec.density, generator) for d in deltas])
    if spec.method == DARE_LINEAR:
        return (dropped * w.view(-1, *([1] * (dropped.dim() - 1)))).sum(dim=0)
    if spec.method == DARE_TIES:
        return _disjoint_mean(dropped, w)
    raise ValueError(f"unknown merge method {spec.method!r}")
