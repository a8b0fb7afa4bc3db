"""Flux: a rectified-flow MMDiT over packed 2x2 latent patches, conditioned on T5 token states,
CLIP-L's pooled output and (dev) a guidance embedding. Textual Inversion trains CLIP-L only."""

from services.families.base import OBJECTIVE_FLOW, ModelFamily, TextEncoderSlot

FLUX = ModelFamily(
    name="flux",
    title="Flux",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "clip", ("lora_te1_", "lora_te_"), "clip_l"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "t5", ("lora_te2_",)),
    ),
    objective=OBJECTIVE_FLOW,
    # The attention projections of both stream kinds (double blocks: image + context; single
    # blocks: one joint stream), as diffusers' and ai-toolkit's Flux LoRA recipes target them.
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    kohya_denoiser_prefix="lora_unet_",
    packed_latents=True,
    tiny_builder="services.families.flux.tiny:build_tiny",
)
