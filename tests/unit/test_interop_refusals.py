"""Every refusal: the status (error type), the field and a message that says what to do."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from services.common.errors import FailedPrecondition, InvalidInput
from services.registry.interop import import_file
from services.registry.interop.shapes import BaseModelShapes
from tests.unit import test_interop_fixtures as fx

# Session fixtures shared by the interop tests.
sd1_shapes = fx.sd1_shapes

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _run(src: Path, shapes: BaseModelShapes, tmp: Path, **hints: str) -> None:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    import_file(src, src.name, shapes, work, **hints)


def _save(tmp: Path, tensors: dict[str, torch.Tensor], name: str = "x.safetensors") -> Path:
    path = tmp / name
    save_file(tensors, str(path))
    return path


def _kohya(name: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.zeros(down), f"{name}.lora_up.weight": torch.zeros(up),
            f"{name}.alpha": torch.tensor(1.0)}


def _zip_pickle(path: Path) -> None:
    """The layout torch.save writes: a zip holding data.pkl (bytes only; nothing is unpickled)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"emb_params": [0.0] * 4}, protocol=2))


@pytest.mark.parametrize(
    ("name", "writer"),
    [
        ("embedding.pt", _zip_pickle),
        ("model.ckpt", lambda p: p.write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))),
        ("lora.safetensors", lambda p: p.write_bytes(pickle.dumps({"a": 1}, protocol=2))),  # pickle, renamed
        ("weights.bin", lambda p: p.write_bytes(b"\x00" * 64)),  # refused by name alone
    ],
)
def test_pickle_is_refused_with_conversion_advice(
    name: str, writer: Callable[[Path], object], sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    src = tmp_path / name
    writer(src)
    with pytest.raises(InvalidInput) as err:
        _run(src, sd1_shapes, tmp_path)
    v = err.value.violations[0]
    assert v.field == "file"
    assert "never unpickles" in v.description and "isolated environment" in v.description
    assert "weights_only=True" in v.description and "save_file" in v.description


@pytest.mark.parametrize(
    ("suffixes", "algo"),
    [
        (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"), "LoHa"),
        (("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"), "LoKr"),
    ],
)
def test_lycoris_is_refused(suffixes: tuple[str, ...], algo: str, sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    src = _save(tmp_path, {f"{Q}.{s}": torch.zeros(2, 2) if s != "alpha" else torch.tensor(1.0) for s in suffixes})
    with pytest.raises(InvalidInput) as err:
        _run(src, sd1_shapes, tmp_path)
    v = err.value.violations[0]
    assert v.field == "file" and algo in v.description and "not supported" in v.description
    assert Q in v.description


def test_dora_is_refused(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    tensors = _kohya(Q, (4, 32), (32, 4))
    tensors[f"{Q}.dora_scale"] = torch.ones(1, 32)
    with pytest.raises(InvalidInput, match="DoRA adapters are not supported"):
        _run(_save(tmp_path, tensors), sd1_shapes, tmp_path)


def test_unknown_module_is_failed_precondition_naming_key(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    sdxl_name = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q"  # an SDXL-only block
    tensors = {**_kohya(Q, (4, 32), (32, 4)), **_kohya(sdxl_name, (4, 1280), (1280, 4))}
    with pytest.raises(FailedPrecondition) as err:
        _run(_save(tmp_path, tensors), sd1_shapes, tmp_path)
    assert err.value.field_name == "file"
    assert err.value.message.startswith(f"{sdxl_name}.lora_down.weight: no unet module")
    assert "different architecture" in err.value.message


def test_wrong_text_encoder_width_is_failed_precondition(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # an SD1.5 (768-wide) text-encoder LoRA
    tensors = {**_kohya(Q, (4, 32), (32, 4)), **_kohya(te, (4, 768), (768, 4))}
    with pytest.raises(FailedPrecondition) as err:
        _run(_save(tmp_path, tensors), sd1_shapes, tmp_path)
    assert err.value.message.startswith(f"{te}.lora_down.weight: LoRA input width 768")
    assert "expected 64" in err.value.message


def test_sdxl_text_encoder_2_on_sd1_base(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    expected = f"^{te2}.lora_down.weight: base model 'tiny-sd' has no text_encoder_2"
    with pytest.raises(FailedPrecondition, match=expected):
        _run(_save(tmp_path, _kohya(te2, (4, 1280), (1280, 4))), sd1_shapes, tmp_path)


def test_diffusers_lora_with_wrong_width(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{key}.lora_A.weight": torch.zeros(4, 768), f"{key}.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(FailedPrecondition, match=rf"^{key}.lora_A.weight: LoRA input width 768 .* expected 64"):
        _run(_save(tmp_path, tensors), sd1_shapes, tmp_path)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (struct.pack("<Q", 10_000) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (b"\x01\x02", "only 2 bytes"),
    ],
)
def test_corrupt_files_are_invalid(data: bytes, words: str, sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    src = tmp_path / "broken.safetensors"
    src.write_bytes(data)
    with pytest.raises(InvalidInput, match=words):
        _run(src, sd1_shapes, tmp_path)


def test_truncated_safetensors_is_invalid(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    src = _save(tmp_path, _kohya(Q, (4, 32), (32, 4)))
    src.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(InvalidInput, match="truncated"):
        _run(src, sd1_shapes, tmp_path)


def test_unrecognised_layout_and_broken_kohya(sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unrecognised adapter file"):
        _run(_save(tmp_path, {"foo": torch.zeros(2, 2, 2), "bar": torch.zeros(3)}), sd1_shapes, tmp_path)
    half = {f"{Q}.lora_down.weight": torch.zeros(4, 32)}
    with pytest.raises(InvalidInput, match="needs both lora_down and lora_up"):
        _run(_save(tmp_path, half, "half.safetensors"), sd1_shapes, tmp_path)


@pytest.mark.parametrize(
    ("hints", "field", "words"),
    [
        ({"kind_hint": "TEXTUAL_INVERSION"}, "kind", "is a LORA adapter, not TEXTUAL_INVERSION"),
        ({"format_hint": "a1111"}, "format", "is in kohya format, not a1111"),
        ({"format_hint": "checkpoint"}, "format", "imported as base models"),
        ({"kind_hint": "DREAMBOOTH"}, "kind", "ImportBaseModel"),
    ],
)
def test_hint_mismatch(hints: dict[str, str], field: str, words: str, sd1_shapes: BaseModelShapes,
                       tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        _run(_save(tmp_path, _kohya(Q, (4, 32), (32, 4))), sd1_shapes, tmp_path, **hints)
    assert err.value.violations[0].field == field and words in err.value.violations[0].description
