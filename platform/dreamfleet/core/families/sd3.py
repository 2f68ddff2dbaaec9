"""Stable Diffusion 3 / 3.5: two CLIP encoders (penultimate hidden states and pooled
projections, concatenated) and T5, joined along the sequence; a rectified-flow MMDiT with
EDM-style output preconditioning (diffusers' train_dreambooth_lora_sd3.py default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamfleet.core.families.base import Cond, FlowFamily, NoisyBatch, Support

TRANSFORMER_TARGETS = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length


class StableDiffusion3(FlowFamily):
    def max_length(self, base, encoder: str) -> int:
        return T5_MAX_LENGTH if encoder == "text_encoder_3" else CLIP_MAX_LENGTH

    def encode(self, base, ids: dict[str, torch.Tensor]) -> Cond:
        hidden, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            out = getattr(base, name)(ids[name], output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        t5 = base.text_encoder_3(ids["text_encoder_3"])[0]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def noisy_batch(self, base, cfg, latents, noise, g) -> NoisyBatch:
        batch = super().noisy_batch(base, cfg, latents, noise, g)
        if cfg.precondition_outputs:  # the model's output is mapped to x0, and x0 is the target
            batch.target = latents
        return batch

    def predict(self, denoiser, batch: NoisyBatch, cond: Cond, cfg) -> torch.Tensor:
        pred = denoiser(hidden_states=batch.noisy, timestep=batch.timesteps,
                        encoder_hidden_states=cond["encoder_hidden_states"],
                        pooled_projections=cond["pooled_projections"], return_dict=False)[0]
        if cfg.precondition_outputs:
            pred = pred * (-batch.sigmas) + batch.noisy
        return pred


FAMILY = StableDiffusion3(
    name="sd3",
    title="Stable Diffusion 3/3.5",
    pipeline_class="StableDiffusion3Pipeline",
    pipeline_classes=("StableDiffusion3Pipeline",),
    denoiser="transformer",
    components={"transformer": "SD3Transformer2DModel", "vae": "AutoencoderKL",
                "text_encoder": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
                "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer_2": "CLIPTokenizer",
                "text_encoder_3": "T5EncoderModel", "tokenizer_3": "T5TokenizerFast"},
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
    lora_targets=TRANSFORMER_TARGETS,
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    default_resolution=1024,
    side_multiple=16,  # latents patchified 2x2
    support=Support(full="no: SD3 trains LoRA only here",
                    text_encoder_lora="no: SD3 trains transformer LoRA only here"),
)
