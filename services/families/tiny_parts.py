"""Pieces the tiny random pipelines of every family share: a small VAE and CLIP text encoders.

All tiny pipelines read the project's own learned CLIP BPE tokenizer (a folder of vocab.json +
merges.txt passed in by the caller), so prompts tokenize the same way in every family.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def tiny_vae(latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    """Two levels (32, 64 channels): 32 px RGB <-> 16x16 latents (downsampling factor 2)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        latent_channels=latent_channels, sample_size=32, **extra,
    )


def clip_vocab(tokenizer_dir: Path) -> dict[str, int]:
    return dict(json.loads((Path(tokenizer_dir) / "vocab.json").read_text()))


def tiny_clip(tokenizer_dir: Path, hidden: int, projection: bool = False) -> Any:
    """A 3-layer CLIP text encoder sized to the tokenizer's vocabulary (with projection: SDXL's
    second encoder, whose pooled `text_embeds` condition the UNet)."""
    vocab = clip_vocab(tokenizer_dir)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
        projection_dim=hidden, hidden_act="quick_gelu",
        bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS],
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def clip_tokenizer(tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def save_with_clip_tokenizers(pipe: Any, out_dir: Path, tokenizer_dir: Path, names: tuple[str, ...]) -> Path:
    """save_pretrained, then put the canonical vocab.json/merges.txt files in each CLIP tokenizer
    folder (transformers 5 writes tokenizer.json; older loaders expect the two files)."""
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name in names:
        shutil.rmtree(out_dir / name, ignore_errors=True)
        shutil.copytree(tokenizer_dir, out_dir / name)
    return out_dir
