"""Reference training steps for SDXL and Flux.1, written from diffusers' documented
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` and ``train_dreambooth_lora_flux.py``
(see docs/benchmarks.md), for ``trainer_vs_diffusers.py``'s interleaved A/B.

As in the scripts with their defaults (no text-encoder training, one instance prompt):
the prompt embeddings are computed once before training; the VAE encodes the batch's pixels
every step (``--cache_latents`` is off by default); AdamW from torch with the script's betas,
weight decay and epsilon; gradient clipping; one optimizer step per batch.
"""

from __future__ import annotations

import copy

import torch
from trainer_vs_diffusers import ReferenceDreamBooth


class ReferenceSDXL(ReferenceDreamBooth):
    """train_dreambooth_lora_sdxl.py: LoRA on the UNet's to_k/q/v/out.0; the VAE in fp32 ("to
    avoid NaN losses"); two CLIP encoders (penultimate hidden states, the second's pooled
    output) encoded once; ``add_time_ids`` from each image's original size and crop."""

    VAE_DTYPE = torch.float32

    def __init__(self, p):
        super().__init__(p)
        base = p.base
        with torch.no_grad():
            self.inst_embeds, self.inst_pooled = self.encode_prompt(base, p.instance_prompt)
            self.class_embeds, self.class_pooled = self.encode_prompt(base, p.class_prompt)

    def encode_prompt(self, base, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_prompt() of the script: each tokenizer pads to its max length."""
        embeds, pooled = [], None
        for tokenizer, encoder in ((base.tokenizer, base.text_encoder), (base.tokenizer_2, base.text_encoder_2)):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(self.device), output_hidden_states=True, return_dict=False)
            pooled = out[0]
            embeds.append(out[-1][-2])
        return torch.cat(embeds, dim=-1), pooled

    def time_ids(self, sizes: torch.Tensor) -> torch.Tensor:
        """compute_time_ids(original_size, crops_coords_top_left) + the target size, per sample."""
        res = self.cfg.resolution
        rows = [list(map(int, s[:2])) + list(map(int, s[2:])) + [res, res] for s in sizes]
        return torch.tensor(rows, device=self.device, dtype=self.weight_dtype)

    def loss(self) -> torch.Tensor:
        p, bs = self.p, self.cfg.batch_size
        idx = torch.randint(len(p.instance), (bs,))
        pixels, sizes = [p.instance.bchw[idx]], [p.instance.sizes[idx]]
        embeds, pooled = [self.inst_embeds] * bs, [self.inst_pooled] * bs
        if self.prior:
            cidx = torch.randint(len(p.klass), (bs,))
            pixels.append(p.klass.bchw[cidx])
            sizes.append(p.klass.sizes[cidx])
            embeds += [self.class_embeds] * bs
            pooled += [self.class_pooled] * bs
        model_input = self.vae.encode(torch.cat(pixels).to(self.device, torch.float32)).latent_dist.sample()
        model_input = (model_input * self.vae.config.scaling_factor).to(self.weight_dtype)
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (model_input.shape[0],),
                                  device=model_input.device)
        noisy = self.noise_scheduler.add_noise(model_input, noise, timesteps.long())
        added = {"time_ids": self.time_ids(torch.cat(sizes)), "text_embeds": torch.cat(pooled)}
        with torch.autocast(self.device.type, dtype=self.mixed or torch.float32, enabled=self.mixed is not None):
            model_pred = self.unet(noisy, timesteps, torch.cat(embeds), added_cond_kwargs=added,
                                   return_dict=False)[0]
        return script_loss(model_pred.float(), noise, None, self.prior, self.cfg.prior_loss_weight)


def script_loss(model_pred, target, weighting, prior: bool, prior_loss_weight: float) -> torch.Tensor:
    """The scripts' loss: the per-sample mean of ``weighting * (pred - target)^2`` (weight 1 in
    the SDXL script's MSE), chunked into instance and prior halves with prior preservation."""
    if weighting is None:
        weighting = torch.ones_like(target[:, :1, :1, :1])
    if prior:
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        weighting, weighting_prior = torch.chunk(weighting, 2, dim=0)
        prior_loss = torch.mean((weighting_prior.float() * (model_pred_prior.float() - target_prior.float()) ** 2)
                                .reshape(target_prior.shape[0], -1), 1).mean()
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2)
                      .reshape(target.shape[0], -1), 1).mean()
    if prior:
        loss = loss + prior_loss_weight * prior_loss
    return loss


class ReferenceFlux(ReferenceDreamBooth):
    """train_dreambooth_lora_flux.py: LoRA on the transformer's attention and feed-forward
    projections; CLIP pooled + T5 embeddings and ``text_ids`` once; per step VAE latents
    ``(x - shift) * scale``, flow-matching noise at sampled σ (``get_sigmas`` looks each
    timestep up), 2x2 packed latents, image ids, embedded guidance, the weighted loss."""

    TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2")
    def __init__(self, p):
        super().__init__(p)
        self.scheduler_copy = copy.deepcopy(self.noise_scheduler)
        with torch.no_grad():
            self.inst_embeds, self.inst_pooled = self.encode_prompt(p.base, p.instance_prompt)
            self.class_embeds, self.class_pooled = self.encode_prompt(p.base, p.class_prompt)
        self.text_ids = torch.zeros(self.inst_embeds.shape[1], 3, device=self.device, dtype=self.weight_dtype)

    def encode_prompt(self, base, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        clip = base.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = base.text_encoder(clip.input_ids.to(self.device), output_hidden_states=False).pooler_output
        t5 = base.tokenizer_2(prompt, padding="max_length", max_length=512, truncation=True, return_tensors="pt")
        return base.text_encoder_2(t5.input_ids.to(self.device), output_hidden_states=False)[0], pooled

    def get_sigmas(self, timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
        sigmas = self.scheduler_copy.sigmas.to(device=self.device, dtype=dtype)
        schedule = self.scheduler_copy.timesteps.to(self.device)
        indices = [(schedule == t).nonzero().item() for t in timesteps.to(self.device)]
        sigma = sigmas[indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    def loss(self) -> torch.Tensor:
        from diffusers import FluxPipeline
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        p, cfg, bs = self.p, self.cfg, self.cfg.batch_size
        pixels = [p.instance.bchw[torch.randint(len(p.instance), (bs,))]]
        embeds, pooled = [self.inst_embeds] * bs, [self.inst_pooled] * bs
        if self.prior:
            pixels.append(p.klass.bchw[torch.randint(len(p.klass), (bs,))])
            embeds += [self.class_embeds] * bs
            pooled += [self.class_pooled] * bs
        vae = self.vae.config
        model_input = self.vae.encode(torch.cat(pixels).to(self.device, self.vae.dtype)).latent_dist.sample()
        model_input = ((model_input - vae.shift_factor) * vae.scaling_factor).to(self.weight_dtype)
        n, c, h, w = model_input.shape
        image_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, self.device, self.weight_dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(weighting_scheme=cfg.weighting_scheme, batch_size=n,
                                                  logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                                  mode_scale=cfg.mode_scale)
        indices = (u * self.scheduler_copy.config.num_train_timesteps).long()
        timesteps = self.scheduler_copy.timesteps[indices].to(device=self.device)
        sigmas = self.get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, batch_size=n, num_channels_latents=c, height=h, width=w)
        guidance = torch.tensor([cfg.guidance_scale], device=self.device).expand(n) \
            if self.unet.config.guidance_embeds else None
        with torch.autocast(self.device.type, dtype=self.mixed or torch.float32, enabled=self.mixed is not None):
            model_pred = self.unet(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                   pooled_projections=torch.cat(pooled), encoder_hidden_states=torch.cat(embeds),
                                   txt_ids=self.text_ids, img_ids=image_ids, return_dict=False)[0]
        model_pred = FluxPipeline._unpack_latents(model_pred, height=h * self.p.base.vae_scale_factor,
                                                  width=w * self.p.base.vae_scale_factor,
                                                  vae_scale_factor=self.p.base.vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=cfg.weighting_scheme, sigmas=sigmas)
        return script_loss(model_pred, noise - model_input, weighting, self.prior, self.cfg.prior_loss_weight)


REFERENCES = {"sdxl": ReferenceSDXL, "flux": ReferenceFlux}
