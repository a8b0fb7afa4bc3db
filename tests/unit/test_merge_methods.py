"""TIES / DARE merge math against peft's own reference implementation (peft.utils.merge_utils)."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from services.inference.merge_methods import (
    DARE_LINEAR,
    DARE_TIES,
    LINEAR,
    LINEAR_MERGE,
    TIES,
    MergeSpec,
    layer_seed,
    merge_deltas,
)


def _deltas(n: int, shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(16, 12), (8, 4, 3, 3)])
def test_ties_equals_peft(density: float, shape: tuple[int, ...]) -> None:
    deltas, weights = _deltas(3, shape), [0.7, -0.4, 1.3]
    ours = merge_deltas(deltas, weights, MergeSpec(TIES, density), "unet.x")
    reference = merge_utils.ties(deltas, torch.tensor(weights), density) if density < 1 else None
    if reference is None:  # peft warns and skips pruning at density 1; the election still applies
        stacked = torch.stack(deltas)
        mask = merge_utils.calculate_majority_sign_mask(stacked)
        reference = merge_utils.disjoint_merge(stacked * torch.tensor(weights).view(-1, *[1] * len(shape)), mask)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize(("method", "peft_fn"), [(DARE_LINEAR, merge_utils.dare_linear),
                                                 (DARE_TIES, merge_utils.dare_ties)])
def test_dare_equals_peft_with_the_documented_generator(method: str, peft_fn: object) -> None:
    deltas, weights = _deltas(2, (32, 24), seed=3), [1.0, 0.6]
    ours = merge_deltas(deltas, weights, MergeSpec(method, 0.3, seed=42), "unet.mid.to_q")
    torch.manual_seed(layer_seed(42, "unet.mid.to_q"))  # peft draws from the global generator, in order
    reference = peft_fn(deltas, torch.tensor(weights), 0.3)  # type: ignore[operator]
    assert torch.equal(ours, reference)


def test_dare_is_deterministic_per_seed_and_layer() -> None:
    deltas, weights = _deltas(2, (32, 24), seed=5), [1.0, 1.0]
    spec = MergeSpec(DARE_LINEAR, 0.5, seed=7)
    torch.manual_seed(0)  # the global generator plays no part
    first = merge_deltas(deltas, weights, spec, "a")
    torch.manual_seed(123)
    assert torch.equal(first, merge_deltas(deltas, weights, spec, "a"))
    assert not torch.equal(first, merge_deltas(deltas, weights, MergeSpec(DARE_LINEAR, 0.5, seed=8), "a"))
    assert not torch.equal(first, merge_deltas(deltas, weights, spec, "b"))
    # Kept entries are rescaled by 1/density: the expectation matches the linear sum.
    big = [torch.ones(200, 200)]
    assert abs(float(merge_deltas(big, [1.0], MergeSpec(DARE_LINEAR, 0.25, 1), "c").mean()) - 1.0) < 0.05


def test_spec_normalisation() -> None:
    assert MergeSpec(LINEAR, 0.3, 9).normalised() == LINEAR_MERGE
    assert MergeSpec(TIES, 0.3, 9).normalised() == MergeSpec(TIES, 0.3, 0)
    assert MergeSpec(DARE_TIES, 0.3, 9).normalised() == MergeSpec(DARE_TIES, 0.3, 9)
    with pytest.raises(ValueError):
        merge_deltas(_deltas(1, (2, 2)), [1.0], MergeSpec("nope", 0.5), "x")
