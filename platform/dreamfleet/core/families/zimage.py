"""Z-Image (Tongyi-MAI, 2025; 6 B, Apache-2.0): a single-stream DiT on rectified flow with one
Qwen3 text encoder (the penultimate hidden states of the chat-templated prompt, padding
dropped), as in diffusers' train_dreambooth_lora_z_image.py: the latents go in as a list of
(C, 1, H, W) frames, the timestep as ``(1000 - t) / 1000``, and the output is negated."""

from __future__ import annotations

import torch

from dreamfleet.core.families.base import Cond, FlowFamily, NoisyBatch, Support

MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length


class ZImage(FlowFamily):
    def max_length(self, base, encoder: str) -> int:
        return MAX_SEQUENCE_LENGTH

    def tokenize(self, base, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The pipeline's ``_encode_prompt``: each prompt as a user turn of the chat template."""
        tok = base.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True) for p in prompts]
        enc = tok(texts, padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
        return {"text_encoder": enc.input_ids.to(device), "text_encoder_mask": enc.attention_mask.to(device)}

    def encode(self, base, ids: dict[str, torch.Tensor]) -> Cond:
        mask = ids["text_encoder_mask"]
        hidden = base.text_encoder(input_ids=ids["text_encoder"], attention_mask=mask.bool(),
                                   output_hidden_states=True).hidden_states[-2]
        return {"encoder_hidden_states": hidden, "mask": mask.to(hidden.dtype)}

    def predict(self, denoiser, batch: NoisyBatch, cond: Cond, cfg) -> torch.Tensor:
        frames = list(batch.noisy.unsqueeze(2).unbind(dim=0))  # (C, 1, H, W) each
        captions = [h[m.bool()] for h, m in zip(cond["encoder_hidden_states"], cond["mask"], strict=True)]
        out = denoiser(frames, (1000 - batch.timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)


FAMILY = ZImage(
    name="zimage",
    title="Z-Image",
    pipeline_class="ZImagePipeline",
    pipeline_classes=("ZImagePipeline",),
    denoiser="transformer",
    components={"transformer": "ZImageTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "Qwen3Model",
                "tokenizer": "Qwen2TokenizerFast"},
    text_encoders=("text_encoder",),
    lora_targets=("to_k", "to_q", "to_v", "to_out.0"),
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    default_resolution=1024,
    side_multiple=16,  # latents patchified 2x2
    support=Support(full="no: Z-Image trains LoRA only here (as diffusers' script)",
                    text_encoder_lora="no: Z-Image trains transformer LoRA only here"),
)
