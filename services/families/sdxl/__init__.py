"""SDXL: a UNet conditioned on two CLIP encoders (penultimate hidden states concatenated), the
second encoder's pooled projection and six "time ids" (original size, crop, target size)."""

from services.families.base import OBJECTIVE_DIFFUSION, ModelFamily, TextEncoderSlot

SDXL = ModelFamily(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                      "StableDiffusionXLInpaintPipeline"),
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoders=(
        TextEncoderSlot("text_encoder", "tokenizer", "clip", ("lora_te1_", "lora_te_"), "clip_l"),
        TextEncoderSlot("text_encoder_2", "tokenizer_2", "clip_projection", ("lora_te2_",), "clip_g"),
    ),
    objective=OBJECTIVE_DIFFUSION,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    tiny_builder="services.families.sdxl.tiny:build_tiny",
)
