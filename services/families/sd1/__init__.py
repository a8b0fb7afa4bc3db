"""Stable Diffusion 1.x/2.x: a UNet cross-attending to one CLIP text encoder's last hidden state.

The tiny random pipeline of this family is the project's own tiny SD (services.tinymodel).
"""

from services.families.base import OBJECTIVE_DIFFUSION, ModelFamily, TextEncoderSlot

SD1 = ModelFamily(
    name="sd1",
    title="Stable Diffusion 1.x/2.x",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoders=(TextEncoderSlot("text_encoder", "tokenizer", "clip", ("lora_te_", "lora_te1_"), "emb_params"),),
    objective=OBJECTIVE_DIFFUSION,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
)
