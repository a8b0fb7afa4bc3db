"""Per-sample LoRA deltas (hetero.py) equal per-row merged weights: Linear (stacked path) and
Conv2d (per-adapter path), mixed ranks, mixed weights, a row without adapters."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from services.inference.hetero import per_sample_deltas, row_plan, supported
from services.inference.lora import LoraMerger, Mix


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.proj = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(x).permute(0, 2, 3, 1))  # type: ignore[no-any-return]


pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")


def merger() -> LoraMerger:
    torch.manual_seed(0)
    net = Net().eval()
    for name, rank in (("a", 2), ("b", 3)):  # mixed ranks
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["conv", "proj"], init_lora_weights=False)
        inject_adapter_in_model(config, net, adapter_name=name)
    out = LoraMerger(net, "unet")
    out.track_new_layers()
    return out


MIXES: list[Mix] = [(("a", 1.0),), (("b", 0.5),), (("a", -0.7), ("b", 0.3)), (), (("b", 0.0),)]


def test_batched_deltas_equal_each_rows_merged_forward() -> None:
    m = merger()
    assert supported([m], {"a", "b"})
    x = torch.randn(len(MIXES), 3, 6, 6)
    with torch.no_grad():
        solo = []
        for i, mix in enumerate(MIXES):
            m.apply(mix)
            solo.append(m.component(x[i:i + 1]))
        groups = [[i] for i in range(len(MIXES))]
        with per_sample_deltas(m, row_plan(groups, MIXES), len(MIXES)) as hooked:
            batched = m.component(x)
    assert hooked == 2
    for i, expected in enumerate(solo):
        assert torch.allclose(batched[i:i + 1], expected, atol=1e-5), i
    # The hooks are gone afterwards and the weights are the base's: a plain forward is the base.
    with torch.no_grad():
        m.apply(())
        assert torch.equal(m.component(x[3:4]), solo[3])


def test_a_forward_over_other_rows_falls_back_to_per_adapter_deltas() -> None:
    m = merger()
    x = torch.randn(2, 3, 6, 6)
    plan = row_plan([[0], [1]], [(("a", 1.0),), (("b", 0.5),)])
    with torch.no_grad():
        m.apply((("a", 1.0),))
        first = m.component(x[:1])
        with per_sample_deltas(m, plan, 4):  # told 4 rows, called with 2: the per-adapter path
            batched = m.component(x)
    assert torch.allclose(batched[:1], first, atol=1e-5)


def test_dora_layers_are_not_supported() -> None:
    net = Net().eval()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["proj"], use_dora=True), net, adapter_name="d")
    m = LoraMerger(net, "unet")
    m.track_new_layers()
    assert not supported([m], {"d"})
    assert supported([m], set())
