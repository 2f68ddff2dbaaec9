"""Flux.1: CLIP (pooled) + T5 (sequence) text encoders, a rectified-flow MMDiT on 2x2-packed
latents with image and text position ids, and an embedded guidance scale for [dev], as in
diffusers' train_dreambooth_lora_flux.py."""

from __future__ import annotations

import functools

import torch

from dreamfleet.core.families.base import Cond, FlowFamily, NoisyBatch, Support

TRANSFORMER_TARGETS = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
T5_MAX_LENGTH = 512  # FluxPipeline's default max_sequence_length


@functools.cache
def guided_flux_pipeline() -> type:
    """diffusers' FluxPipeline with two defaults taken from the model instead of the call site:

    - the T5 length is the tokenizer's ``model_max_length`` when it is under 512, so that a
      model trained on short prompts (the toy Flux: 32 tokens) samples as it was trained;
    - a model trained with caption dropout instead of guidance distillation (``true_cfg``; its
      transformer has no guidance embedding) gets classifier-free guidance from
      ``guidance_scale``, with the empty prompt as the negative one (diffusers' ``true_cfg_scale``).

    The subclass keeps the name, so a saved folder still says ``FluxPipeline``.
    """
    from diffusers import FluxPipeline as Stock

    class FluxPipeline(Stock):
        true_cfg = False

        def __call__(self, prompt=None, *args, **kw):
            kw.setdefault("max_sequence_length", min(T5_MAX_LENGTH, int(self.tokenizer_2.model_max_length)))
            scale = kw.get("guidance_scale", 3.5)
            if self.true_cfg and scale > 1 and "true_cfg_scale" not in kw and kw.get("prompt_embeds") is None:
                kw["true_cfg_scale"] = scale
                if kw.get("negative_prompt") is None:
                    kw["negative_prompt"] = [""] * (1 if isinstance(prompt, str) else len(prompt))
            return super().__call__(prompt, *args, **kw)

    return FluxPipeline


class Flux(FlowFamily):
    def max_length(self, base, encoder: str) -> int:
        limit = int(self.tokenizer(base, encoder).model_max_length)
        return limit if encoder == "text_encoder" else min(T5_MAX_LENGTH, limit)

    def pipeline_type(self) -> type:
        return guided_flux_pipeline()

    def pipeline(self, base, **replace):
        pipe = super().pipeline(base, **replace)
        pipe.true_cfg = bool(base.extra.get("true_cfg"))
        return pipe

    def encode(self, base, ids: dict[str, torch.Tensor]) -> Cond:
        pooled = base.text_encoder(ids["text_encoder"], output_hidden_states=False).pooler_output
        hidden = base.text_encoder_2(ids["text_encoder_2"], output_hidden_states=False)[0]
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def predict(self, denoiser, batch: NoisyBatch, cond: Cond, cfg) -> torch.Tensor:
        from diffusers import FluxPipeline

        x = batch.noisy
        n, c, h, w = x.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype)
        config = getattr(denoiser, "module", denoiser).config
        guidance = torch.full((n,), float(cfg.guidance_scale), device=x.device) if config.guidance_embeds else None
        out = denoiser(
            hidden_states=FluxPipeline._pack_latents(x, n, c, h, w),
            timestep=batch.timesteps / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, height=h, width=w, vae_scale_factor=1)


FAMILY = Flux(
    name="flux",
    title="Flux.1",
    pipeline_class="FluxPipeline",
    pipeline_classes=("FluxPipeline",),
    denoiser="transformer",
    components={"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
                "tokenizer": "CLIPTokenizer", "text_encoder_2": "T5EncoderModel", "tokenizer_2": "T5TokenizerFast"},
    text_encoders=("text_encoder", "text_encoder_2"),
    lora_targets=TRANSFORMER_TARGETS,
    training_scheduler="FlowMatchEulerDiscreteScheduler",
    default_resolution=1024,
    side_multiple=16,  # latents patchified 2x2
    support=Support(full="no: Flux trains LoRA only here (a full 12B fine-tune is out of scope)"),
)
