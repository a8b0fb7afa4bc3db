"""Shared helpers for the interop tests: a tiny SDXL pipeline, image generation, and
hand-written foreign adapter files.

Foreign files are built here WITHOUT the interop package: kohya key names are spelled out
from the tiny models' known structure (the diffusers <-> sgm block numbering is written by
hand below), so an exporter or name-table bug cannot make an importer test pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.registry.interop.shapes import BaseModelShapes

STEPS = 2


def _byte_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary with no merges: every prompt character is a token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in codes]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return vocab


def _text_encoder(hidden: int, with_projection: bool, seed: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513, projection_dim=hidden)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_tiny_sdxl(out_dir: Path) -> Path:
    """A random tiny SDXL pipeline (32 px): encoders 32 and 64 wide so the two are distinguishable."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=96, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=112, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    tokenizers = [CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=16) for _ in range(2)]
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=_text_encoder(32, False, 1), text_encoder_2=_text_encoder(64, True, 2),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet, scheduler=EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once per session even though each test module re-exports this fixture."""
    path = tmp_path_factory.getbasetemp() / "interop-tiny-sdxl"
    return path if (path / "model_index.json").is_file() else build_tiny_sdxl(path)


@pytest.fixture(scope="session")
def sd1_shapes(tiny_random_pipeline_dir: Path) -> BaseModelShapes:
    return BaseModelShapes.from_dir(tiny_random_pipeline_dir, name="tiny-sd")


@pytest.fixture(scope="session")
def sdxl_shapes(tiny_sdxl_dir: Path) -> BaseModelShapes:
    return BaseModelShapes.from_dir(tiny_sdxl_dir, name="tiny-sdxl")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_pipe(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, prompt: str = "a photo of a red box") -> np.ndarray:
    """Two denoising steps at 32 px with a fixed seed: deterministic on CPU."""
    g = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="np", height=32, width=32)
    return np.asarray(out.images)


# --- hand-written module lists of the tiny models ------------------------------------------
def _transformer_children(n_blocks: int) -> list[str]:
    out = ["proj_in", "proj_out"]
    for t in range(n_blocks):
        for attn in ("attn1", "attn2"):
            out += [f"transformer_blocks.{t}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        out += [f"transformer_blocks.{t}.ff.net.0.proj", f"transformer_blocks.{t}.ff.net.2"]
    return out


def te_children(layers: int) -> list[str]:
    """kohya trains every linear of CLIPAttention and CLIPMLP (diffusers needs them all)."""
    return [f"encoder.layers.{i}.{p}" for i in range(layers)
            for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                      "mlp.fc1", "mlp.fc2")]


def sd1_unet_modules() -> list[tuple[str, str]]:
    """(kohya name without prefix, diffusers path) for the tiny SD1 UNet's attention blocks."""
    blocks = ["down_blocks.0.attentions.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
              "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0",
              "up_blocks.1.attentions.1"]
    pairs = [(f"{b}.{c}", f"{b}.{c}") for b in blocks for c in _transformer_children(1)]
    return [(k.replace(".", "_"), d) for k, d in pairs]


# tiny SDXL (layers_per_block 2, blocks [DownBlock2D, CrossAttnDownBlock2D]): sgm numbering by hand.
SDXL_SGM_BLOCKS = {
    "input_blocks.4.1": ("down_blocks.1.attentions.0", 2),
    "input_blocks.5.1": ("down_blocks.1.attentions.1", 2),
    "middle_block.1": ("mid_block.attentions.0", 2),
    "output_blocks.0.1": ("up_blocks.0.attentions.0", 2),
    "output_blocks.1.1": ("up_blocks.0.attentions.1", 2),
    "output_blocks.2.1": ("up_blocks.0.attentions.2", 2),
}


def sdxl_unet_modules() -> list[tuple[str, str]]:
    pairs = []
    for sgm, (diffusers_block, n) in SDXL_SGM_BLOCKS.items():
        pairs += [(f"{sgm}.{c}".replace(".", "_"), f"{diffusers_block}.{c}") for c in _transformer_children(n)]
    return pairs


def lora_pair(weight: torch.Tensor, rank: int, g: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Random (down, up) for a module weight; 1x1 convs get 4-D LoRA tensors."""
    extra = (1, 1) if weight.ndim == 4 else ()
    down = torch.randn(rank, weight.shape[1], *extra, generator=g) * 0.3
    up = torch.randn(weight.shape[0], rank, *extra, generator=g) * 0.3
    return down.to(dtype), up.to(dtype)


def write_kohya(
    pipe: Any, dest: Path, *, sdxl: bool, rank: int = 4, alpha: float | None = 1.0, dtype: torch.dtype = torch.float16,
    seed: int = 0, alphas: dict[str, float] | None = None, ranks: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """A kohya LoRA over every attention linear of the tiny UNet and all text-encoder linears."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    unet_mods = dict(pipe.unet.named_modules())
    unet_names = sdxl_unet_modules() if sdxl else sd1_unet_modules()
    entries = [(f"lora_unet_{k}", unet_mods[d].weight) for k, d in unet_names]
    encoders = [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)] if sdxl else [
        ("lora_te_", pipe.text_encoder)]
    for prefix, te in encoders:
        mods = dict(te.named_modules())
        base = "text_model." if hasattr(te, "text_model") else ""
        layers = te.config.num_hidden_layers
        entries += [(f"{prefix}text_model_{c.replace('.', '_')}", mods[base + c].weight) for c in te_children(layers)]
    sd: dict[str, torch.Tensor] = {}
    for name, weight in entries:
        r = (ranks or {}).get(name, rank)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = lora_pair(weight, r, g, dtype)
        a = (alphas or {}).get(name, alpha)
        if a is not None:
            sd[f"{name}.alpha"] = torch.tensor(a, dtype=dtype)
    save_file(sd, str(dest), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})
    return sd
