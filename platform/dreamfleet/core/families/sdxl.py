"""Stable Diffusion XL: two CLIP text encoders (penultimate hidden states, concatenated, plus
the second one's pooled embedding) and size/crop micro-conditioning, as in diffusers'
train_dreambooth_lora_sdxl.py."""

from __future__ import annotations

import torch

from dreamfleet.core.families.base import Cond, DDPMFamily, NoisyBatch
from dreamfleet.core.families.sd import UNET_TARGETS


class StableDiffusionXL(DDPMFamily):
    def encode(self, base, ids: dict[str, torch.Tensor]) -> Cond:
        hidden, pooled = [], None
        for name in self.text_encoders:
            out = getattr(base, name)(ids[name], output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output, as the pipeline takes
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def micro_conditioning(self, cond: Cond, sizes: torch.Tensor, target_hw: tuple[int, int]) -> Cond:
        """``add_time_ids`` = original size + crop top-left + target size, per sample."""
        target = torch.tensor(list(target_hw), dtype=sizes.dtype).expand(len(sizes), 2)
        return {**cond, "time_ids": torch.cat([sizes, target], dim=1).float()}

    def predict(self, denoiser, batch: NoisyBatch, cond: Cond, cfg) -> torch.Tensor:
        dtype = cond["encoder_hidden_states"].dtype
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"].to(batch.noisy.device, dtype)}
        return denoiser(batch.noisy, batch.timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample


FAMILY = StableDiffusionXL(
    name="sdxl",
    title="Stable Diffusion XL",
    pipeline_class="StableDiffusionXLPipeline",
    pipeline_classes=("StableDiffusionXLPipeline",),
    denoiser="unet",
    components={"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer", "text_encoder_2": "CLIPTextModelWithProjection",
                "tokenizer_2": "CLIPTokenizer"},
    text_encoders=("text_encoder", "text_encoder_2"),
    lora_targets=UNET_TARGETS,
    convert_lora_keys=True,
    default_resolution=1024,
)
