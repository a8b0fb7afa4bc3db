"""A Stable Diffusion 1.5-shaped pipeline with random weights, for GPU timing only.

Same component shapes as SD 1.5 (860M-parameter UNet, 84M VAE, 123M CLIP ViT-L/14 text encoder,
512 px), with the project's self-made tokenizer: no weights can be downloaded here, and
throughput does not depend on what the weights are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from services.tinymodel.pipeline import assemble, save_pipeline
from services.tinymodel.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tokenizer


def build_sd15_random(out_dir: Path, seed: int = 0) -> Path:
    """Write the pipeline folder and return it (a few GB: keep it on scratch disk)."""
    out_dir = Path(out_dir)
    tok_dir = out_dir.parent / f".{out_dir.name}.tokenizer"
    vocab = write_tokenizer(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=MODEL_MAX_LENGTH,
            hidden_act="quick_gelu",
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )
    pipe = assemble(vae, unet, text_encoder, CLIPTokenizer.from_pretrained(tok_dir))
    save_pipeline(pipe, out_dir, tok_dir)
    return out_dir
