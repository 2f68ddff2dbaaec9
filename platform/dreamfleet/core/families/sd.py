"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, DDPM ε- or v-prediction."""

from __future__ import annotations

import torch

from dreamfleet.core.families.base import Cond, DDPMFamily, NoisyBatch, Support

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class StableDiffusion(DDPMFamily):
    def encode(self, base, ids: dict[str, torch.Tensor]) -> Cond:
        return {"encoder_hidden_states": base.text_encoder(ids["text_encoder"])[0]}

    def predict(self, denoiser, batch: NoisyBatch, cond: Cond, cfg) -> torch.Tensor:
        return denoiser(batch.noisy, batch.timesteps, cond["encoder_hidden_states"]).sample

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


FAMILY = StableDiffusion(
    name="sd",
    title="Stable Diffusion 1.x/2.x",
    pipeline_class="StableDiffusionPipeline",
    pipeline_classes=("StableDiffusionPipeline",),
    denoiser="unet",
    components={"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer"},
    text_encoders=("text_encoder",),
    lora_targets=UNET_TARGETS,
    convert_lora_keys=True,
    support=Support(apprentice="yes", profusion="yes"),
)
