"""A tiny random Flux pipeline: the real MMDiT (double- and single-stream blocks, 3-axis RoPE,
guidance embedding), a T5 encoder and CLIP-L, at 32 px with 4 latent channels packed into
16-channel 2x2 tokens.

T5's SentencePiece vocabulary cannot be downloaded, so the T5 tokenizer is a Unigram model (the
type T5 uses) over the same words as the CLIP vocabulary, saved as a T5Tokenizer
(tokenizer.json), which is what FluxPipeline loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from services.families.tiny_parts import (
    clip_tokenizer,
    clip_vocab,
    save_with_clip_tokenizers,
    tiny_clip,
    tiny_vae,
)

HIDDEN = 32  # T5 d_model = joint_attention_dim; CLIP hidden = pooled_projection_dim
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def t5_tokenizer(tokenizer_dir: Path) -> T5Tokenizer:
    """A Unigram vocabulary (T5's model type): every CLIP word as one "▁word" piece, single
    letters and digits as a fallback, so no prompt word maps to <unk>."""
    words = sorted({t[: -len("</w>")] for t in clip_vocab(tokenizer_dir) if t.endswith("</w>")})
    pieces = [(f"▁{word}", -1.0) for word in words if word.isalnum()]
    pieces += [(char, -8.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = [(token, 0.0) for token in T5_SPECIALS] + [("▁", -2.0)] + pieces
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def tiny_t5(vocab_size: int) -> T5EncoderModel:
    config = T5Config(vocab_size=vocab_size, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(config)


def tiny_transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )


def tiny_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux-dev's scheduler config: shifted sigmas, resolution-dependent (dynamic) shift."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def build_tiny(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    t5_tok = t5_tokenizer(tokenizer_dir)
    pipe = FluxPipeline(
        scheduler=tiny_scheduler(),
        vae=tiny_vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=tiny_clip(tokenizer_dir, HIDDEN), tokenizer=clip_tokenizer(tokenizer_dir),
        text_encoder_2=tiny_t5(len(t5_tok)), tokenizer_2=t5_tok, transformer=tiny_transformer(),
    )
    return save_with_clip_tokenizers(pipe, out_dir, tokenizer_dir, ("tokenizer",))
