"""Textual inversion: diffusers / A1111 (multi-vector) / SDXL embeddings, import and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.errors import FailedPrecondition
from services.registry.interop import export_embedding, import_file
from services.registry.interop.api import read_metadata
from services.registry.interop.shapes import BaseModelShapes
from services.registry.manifests import TI_EMBEDS_FILE
from tests.unit import test_interop_fixtures as fx
from tests.unit.test_interop_fixtures import generate, load_pipe

# Session fixtures shared by the interop tests.
_one_thread = fx._one_thread
sd1_shapes = fx.sd1_shapes
sdxl_shapes = fx.sdxl_shapes
tiny_sdxl_dir = fx.tiny_sdxl_dir

TOKEN = "<cat-toy>"
PROMPT = f"a photo of {TOKEN} on a table"


def _vectors(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _import(src: Path, shapes: BaseModelShapes, tmp: Path, token: str = "") -> tuple[Path, list[str], str]:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    result = import_file(src, src.name, shapes, work, trigger_token=token)
    assert result.kind == "TEXTUAL_INVERSION"
    return result.files[TI_EMBEDS_FILE], result.trigger_tokens, result.source_format


def _sd1_image(base: Path, embeds: Path, token: str, prompt: str = PROMPT) -> np.ndarray:
    pipe = load_pipe(base)
    pipe.load_textual_inversion(str(embeds), token=token)
    return generate(pipe, prompt)


def test_a1111_multi_vector_matches_diffusers(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    dim = sd1_shapes.embedding_dims["text_encoder"]
    src = tmp_path / "cat-toy.safetensors"
    save_file({"emb_params": _vectors(3, dim, 1)}, str(src))
    stored, tokens, fmt = _import(src, sd1_shapes, tmp_path, token=TOKEN)
    assert (tokens, fmt) == ([TOKEN], "a1111")
    assert load_file(str(stored))[TOKEN].shape == (3, dim)

    reference = _sd1_image(tiny_random_pipeline_dir, src, TOKEN)  # diffusers reads emb_params itself
    assert np.abs(reference - generate(load_pipe(tiny_random_pipeline_dir), PROMPT)).max() > 1e-3
    assert np.array_equal(_sd1_image(tiny_random_pipeline_dir, stored, TOKEN), reference)


def test_a1111_token_defaults_to_file_name_and_diffusers_key(
    sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    dim = sd1_shapes.embedding_dims["text_encoder"]
    a1111 = tmp_path / "my style.safetensors"
    save_file({"emb_params": _vectors(2, dim, 2)}, str(a1111))
    assert _import(a1111, sd1_shapes, tmp_path)[1] == ["my-style"]  # A1111's rule, spaces made safe
    learned = tmp_path / "learned_embeds.safetensors"
    save_file({"<toy>": _vectors(1, dim, 3)[0]}, str(learned))
    stored, tokens, fmt = _import(learned, sd1_shapes, tmp_path)
    assert (tokens, fmt) == (["<toy>"], "diffusers")
    assert load_file(str(stored))["<toy>"].shape == (dim,)


def test_diffusers_ti_with_new_token_matches_diffusers(
    tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    src = tmp_path / "learned_embeds.safetensors"
    save_file({"<old>": _vectors(2, sd1_shapes.embedding_dims["text_encoder"], 4)}, str(src))
    stored, tokens, _ = _import(src, sd1_shapes, tmp_path, token=TOKEN)
    assert tokens == [TOKEN] and list(load_file(str(stored))) == [TOKEN]
    reference = _sd1_image(tiny_random_pipeline_dir, src, TOKEN)
    assert np.array_equal(_sd1_image(tiny_random_pipeline_dir, stored, TOKEN), reference)


def _sdxl_image(base: Path, state: dict[str, torch.Tensor], token: str) -> np.ndarray:
    """diffusers' documented way to load an SDXL embedding: one call per text encoder."""
    pipe = load_pipe(base)
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return generate(pipe, f"a photo of {token}")


def test_sdxl_clip_l_clip_g_matches_diffusers(
    tiny_sdxl_dir: Path, sdxl_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    src = tmp_path / "xl-style.safetensors"
    original = {"clip_l": _vectors(2, 32, 5), "clip_g": _vectors(2, 64, 6)}
    save_file(original, str(src))
    stored, tokens, fmt = _import(src, sdxl_shapes, tmp_path, token="<xl>")
    assert (tokens, fmt) == (["<xl>"], "a1111")
    reference = _sdxl_image(tiny_sdxl_dir, load_file(str(src)), "<xl>")
    assert np.array_equal(_sdxl_image(tiny_sdxl_dir, load_file(str(stored)), "<xl>"), reference)

    exported = export_embedding(stored, sdxl_shapes, "a1111", tmp_path / "out.safetensors", "xl-style", "<xl>")
    out = load_file(str(exported))
    assert set(out) == {"clip_l", "clip_g"} and all(torch.equal(out[k], original[k]) for k in out)
    assert read_metadata(exported)["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"


def test_export_a1111_round_trip(tiny_random_pipeline_dir: Path, sd1_shapes: BaseModelShapes, tmp_path: Path) -> None:
    src = tmp_path / "learned_embeds.safetensors"
    save_file({TOKEN: _vectors(3, sd1_shapes.embedding_dims["text_encoder"], 7)}, str(src))
    stored, _, _ = _import(src, sd1_shapes, tmp_path)
    original = _sd1_image(tiny_random_pipeline_dir, stored, TOKEN)

    exported = export_embedding(stored, sd1_shapes, "a1111", tmp_path / "cat-toy.safetensors", "cat-toy", TOKEN)
    tensors = load_file(str(exported))
    assert list(tensors) == ["emb_params"] and tensors["emb_params"].shape == (3, 64)
    meta = read_metadata(exported)
    assert meta["name"] == TOKEN and meta["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert np.array_equal(_sd1_image(tiny_random_pipeline_dir, exported, TOKEN), original)  # diffusers reads it
    back = tmp_path / "back"
    back.mkdir()
    again, _, fmt = _import(exported, sd1_shapes, back, token=TOKEN)
    assert fmt == "a1111" and np.array_equal(_sd1_image(tiny_random_pipeline_dir, again, TOKEN), original)


@pytest.mark.parametrize(
    ("tensors", "key", "words"),
    [
        ({"emb_params": torch.zeros(2, 768)}, "emb_params", "expected [n, 64]"),
        ({"clip_l": torch.zeros(1, 64), "clip_g": torch.zeros(1, 64)}, "clip_g", "no text_encoder_2"),
    ],
)
def test_embedding_that_does_not_fit_base_is_failed_precondition(
    tensors: dict[str, torch.Tensor], key: str, words: str, sd1_shapes: BaseModelShapes, tmp_path: Path
) -> None:
    src = tmp_path / "bad.safetensors"
    save_file(tensors, str(src))
    with pytest.raises(FailedPrecondition) as err:
        _import(src, sd1_shapes, tmp_path)
    assert err.value.field_name == "file"
    assert err.value.message.startswith(f"{key}:") and words in err.value.message


def test_single_encoder_embedding_on_sdxl_is_failed_precondition(sdxl_shapes: BaseModelShapes, tmp_path: Path) -> None:
    src = tmp_path / "sd1.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(src))
    with pytest.raises(FailedPrecondition, match="needs an embedding with both 'clip_l' and 'clip_g'"):
        _import(src, sdxl_shapes, tmp_path)
