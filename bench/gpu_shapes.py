"""Random-weight pipelines with published shapes, built on the device: what the GPU suite times.

SD 1.5 (runwayml/stable-diffusion-v1-5), SDXL base 1.0 and a Flux-dev-shaped pipeline, all with
the project's own tokenizer and random weights (nothing can be downloaded; timings do not depend
on the weights). `--cpu-smoke` builds the same code paths with tiny shapes.

Flux is built at Flux-dev's widths (3072 hidden, 24 heads, T5 width 4096, CLIP-L pooled 768,
16 latent channels, guidance embedding) but with 4 double-stream and 8 single-stream blocks
instead of 19 and 38, and a 2-layer T5: the full 12B + 4.7B would spend most of the suite's
few minutes on random initialisation and host memory. Per-block cost is Flux's own, so the
ratios (LoRA vs base, ours vs diffusers) carry over; absolute latencies are about 1/4 of Flux-dev.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

from services.tinymodel.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tokenizer

# --- published shapes (SD 1.5: runwayml/stable-diffusion-v1-5; SDXL: stabilityai/sdxl-base-1.0) ---
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
# --cpu-smoke: the same code with tiny shapes
TINY_UNET = dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
TINY_XL_UNET = dict(TINY_UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=80, transformer_layers_per_block=[1, 1])
TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32, hidden_act="quick_gelu")
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, timestep_spacing="leading")
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TRANSFORMER = dict(num_layers=4, num_single_layers=8, guidance_embeds=True)  # Flux-dev widths
FLUX_VAE = dict(VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
FLUX_T5 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu")
TINY_FLUX_TRANSFORMER = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                             axes_dims_rope=(4, 4, 8), guidance_embeds=True)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu")
FLOW_SCHEDULE = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                     base_image_seq_len=256, max_image_seq_len=4096)


def text_encoder(vocab: dict[str, int], config: dict[str, Any], projection: bool = False) -> torch.nn.Module:
    cfg = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=MODEL_MAX_LENGTH, bos_token_id=vocab[BOS],
                         eos_token_id=vocab[EOS], pad_token_id=vocab[EOS], **config)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def build(kind: str, tmp: Path, device: str, dtype: torch.dtype, smoke: bool) -> Any:
    """A random-weight SD1.5 ("sd15"), SDXL ("sdxl") or Flux ("flux") pipeline, built on the device."""
    vocab = write_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    torch.manual_seed(0)
    # Built outside the device context: under `torch.device("cuda")` its alphas_cumprod would be
    # a CUDA tensor, and EulerDiscreteScheduler.set_timesteps calls np.array() on it (TypeError).
    scheduler = EulerDiscreteScheduler(**SCHEDULE)
    with torch.device(device):  # models only: random init on the GPU takes seconds, not minutes
        if kind == "sd15":
            unet = UNet2DConditionModel(**(TINY_UNET if smoke else SD15_UNET))
            vae = AutoencoderKL(**(TINY_VAE if smoke else VAE), scaling_factor=0.18215)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(vocab, TINY_CLIP if smoke else CLIP_L),
                                           tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        elif kind == "flux":
            pipe = _flux(vocab, tokenizer, smoke)
        else:
            unet = UNet2DConditionModel(**(TINY_XL_UNET if smoke else SDXL_UNET))
            vae = AutoencoderKL(**(TINY_VAE if smoke else VAE), scaling_factor=0.13025, force_upcast=False)
            small = dict(TINY_CLIP, hidden_size=32) if smoke else CLIP_L
            big = dict(TINY_CLIP, hidden_size=32, projection_dim=32) if smoke else CLIP_G
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(vocab, small),
                                             text_encoder_2=text_encoder(vocab, big, projection=True),
                                             tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
                                             scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def _flux(vocab: dict[str, int], tokenizer: CLIPTokenizer, smoke: bool) -> Any:
    from services.families.flux.tiny import t5_tokenizer

    t5 = T5EncoderModel(T5Config(vocab_size=len(vocab), **(TINY_T5 if smoke else FLUX_T5)))
    clip = text_encoder(vocab, TINY_CLIP if smoke else CLIP_L)
    transformer = FluxTransformer2DModel(**(TINY_FLUX_TRANSFORMER if smoke else FLUX_TRANSFORMER))
    vae = AutoencoderKL(**(dict(TINY_VAE, latent_channels=4) if smoke else FLUX_VAE),
                        shift_factor=0.1159, scaling_factor=0.3611)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULE), vae=vae, text_encoder=clip,
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer(Path(tokenizer.name_or_path)),
                        transformer=transformer)


def denoiser(pipe: Any) -> tuple[str, torch.nn.Module]:
    """("unet", pipe.unet) or ("transformer", pipe.transformer): what LoRAs wrap."""
    name = "transformer" if hasattr(pipe, "transformer") and pipe.transformer is not None else "unet"
    return name, getattr(pipe, name)


def random_lora(pipe: Any, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-layout LoRA on the denoiser's attention projections, random non-zero A and B."""
    prefix, model = denoiser(pipe)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS):
            out[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.02
            out[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.02
    return out




def save_random(model: str, out: Path) -> Path:
    """An SDXL- or Flux-shaped random pipeline written as a diffusers folder (bf16, built on CUDA
    when present): the base bench/train_throughput.py's children load."""
    from services.families.tiny_parts import save_with_clip_tokenizers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = build(model, out.parent / f".{out.name}.build", device, torch.bfloat16, smoke=False)
    names = ("tokenizer", "tokenizer_2") if model == "sdxl" else ("tokenizer",)
    return save_with_clip_tokenizers(pipe, out, out.parent / f".{out.name}.build" / "tokenizer", names)
