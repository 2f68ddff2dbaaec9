"""Fusion Sampling (ProFusion, Zhou et al., 2023) on DDIM, for ProFusion and DreamBooth experts.

Per denoising step t (``../shared/PROFUSION.md``):

1. **fusion stage**, ``refine_step`` (K) times: ε̃ = ε(x_t, ∅) + w_f·[ε(x_t, C^γ) − ε(x_t, ∅)],
   then the closed-form update :func:`fusion_update` (one DDIM-σ step to t−1 and a re-noise
   back to t; with η_f = 0 it is the identity). One UNet pass on a batch of 2 per image.
2. **refinement**: ε̂ = ε(x_t, ∅) + w1·[ε(x_t, C) − ε(x_t, ∅)] + w2·[ε(x_t, C̃) − ε(x_t, ∅)],
   then ``DDIMScheduler.step(ε̂, eta=η)``; C̃ is evaluated only when w2 ≠ 0.

C is the prompt with the subject: for a ProFusion expert S* comes from PromptNet at every
step (:class:`PromptNetConditioning`); for a DreamBooth expert C is "a [V] class ..." and C̃
"a class ..." (:class:`StaticConditioning`). C^γ is C with the text encoder's *output* at the
subject's positions multiplied by γ. ∅ and C̃ are encoded once per request. v-prediction
models are converted to ε before guidance (the DDIM step then runs on ε).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dreamfleet.core.errors import ConfigError


@dataclass(frozen=True)
class FusionParams:
    """Every parameter of Fusion Sampling, with the official code's defaults."""

    num_inference_steps: int = 50
    guidance_scale: float = 5.0  # w1: guidance toward C (the prompt with the subject)
    guidance_scale_ref: float = 0.0  # w2: guidance toward C̃ (the prompt with the class noun)
    refine_guidance_scale: float = 3.0  # w_f: guidance of the fusion stage
    refine_emb_scale: float = 0.8  # γ: scale of the subject's text-encoder output in the fusion stage
    refine_eta: float = 1.0  # η_f: stochasticity of the fusion stage (0: the stage is the identity)
    refine_step: int = 0  # K: fusion stages per step (0: composable classifier-free guidance)
    eta: float = 0.0  # η: DDIM eta of the refinement step

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1 or self.refine_step < 0:
            raise ConfigError("fusion: num_inference_steps must be >= 1 and refine_step >= 0")
        if not (0.0 <= self.refine_eta <= 1.0 and 0.0 <= self.eta <= 1.0):
            raise ConfigError("fusion: refine_eta and eta must be in [0, 1]")

    @classmethod
    def from_request(cls, values: dict[str, Any]) -> FusionParams:
        """From a request's or CLI's fields (unknown names refused, naming them)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown Fusion Sampling parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def fusion_update(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_p: float, eta_f: float,
                  z: torch.Tensor) -> torch.Tensor:
    """x_t ← x_t − σ²·sqrt(1−ā_t)/(1−ā_p)·ε̃ + σ·sqrt((1−ā_t)(2−2ā_p−σ²))/(1−ā_p)·z,
    σ = η_f·sqrt((1−ā_p)/(1−ā_t)·(1−ā_t/ā_p))."""
    if eta_f == 0.0 or a_p >= 1.0:
        return x  # σ = 0: nothing moves (and at the last step ā_p = 1)
    var = eta_f**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    sigma = var**0.5
    drift = var * (1 - a_t) ** 0.5 / (1 - a_p)
    spread = sigma * ((1 - a_t) * (2 - 2 * a_p - var)) ** 0.5 / (1 - a_p)
    return x - drift * eps + spread * z


class Conditioning(Protocol):
    """The conditionings of one request, batch-aligned with the latents."""

    uncond: torch.Tensor  # ∅: [B, L, D]
    reference: torch.Tensor | None  # C̃: [B, L, D] (None when w2 = 0)

    def personal(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C, C^γ) at this latent and timestep."""


def scale_positions(hidden: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The text encoder's output with the subject's positions multiplied by γ."""
    out = hidden.clone()
    out[mask] = out[mask] * gamma
    return out


@dataclass
class StaticConditioning:
    """A DreamBooth expert (or any fixed S*): C and C^γ do not depend on the latent."""

    uncond: torch.Tensor
    cond: torch.Tensor
    cond_gamma: torch.Tensor
    reference: torch.Tensor | None = None

    def personal(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cond, self.cond_gamma


class FusionSampler:
    """The sampling loop over a UNet and a DDIM schedule (a family's scheduler config)."""

    def __init__(self, unet, scheduler_config: dict, params: FusionParams):
        from diffusers import DDIMScheduler

        self.unet, self.p = unet, params
        self.v_pred = scheduler_config.get("prediction_type") == "v_prediction"
        self.scheduler = DDIMScheduler.from_config(scheduler_config, prediction_type="epsilon")
        self.scheduler.set_timesteps(params.num_inference_steps)

    def _alphas(self, t: torch.Tensor) -> tuple[float, float]:
        s = self.scheduler
        prev = int(t) - s.config.num_train_timesteps // s.num_inference_steps
        a_p = s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod
        return float(s.alphas_cumprod[int(t)]), float(a_p)

    def eps(self, x: torch.Tensor, t: torch.Tensor, embs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """ε under each conditioning: one UNet pass on the stacked batch, as the stock pipeline does."""
        n = len(embs)
        out = self.unet(torch.cat([x] * n), t, encoder_hidden_states=torch.cat(embs), return_dict=False)[0]
        if self.v_pred:  # ε = sqrt(ā_t)·v + sqrt(1−ā_t)·x_t
            a = self.scheduler.alphas_cumprod[int(t)].to(out.device, out.dtype)
            out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([x] * n)
        return out.chunk(n)

    def fusion_stage(self, x, t, cond: Conditioning, generator) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        a_t, a_p = self._alphas(t)
        _, c_gamma = cond.personal(x, t)
        e_u, e_g = self.eps(x, t, [cond.uncond, c_gamma])
        e = e_u + self.p.refine_guidance_scale * (e_g - e_u)
        z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return fusion_update(x, e, a_t, a_p, self.p.refine_eta, z)

    def refine(self, x, t, cond: Conditioning, generator) -> torch.Tensor:
        c, _ = cond.personal(x, t)
        use_ref = self.p.guidance_scale_ref != 0.0
        if use_ref and cond.reference is None:
            raise ConfigError("guidance_scale_ref (w2) needs the class prompt C̃")
        outs = self.eps(x, t, [cond.uncond, c, *([cond.reference] if use_ref else [])])
        e = outs[0] + self.p.guidance_scale * (outs[1] - outs[0])
        if use_ref:
            e = e + self.p.guidance_scale_ref * (outs[2] - outs[0])
        return self.scheduler.step(e, t, x, eta=self.p.eta, generator=generator, return_dict=False)[0]

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, cond: Conditioning, generator=None) -> torch.Tensor:
        x = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            for _ in range(self.p.refine_step):
                x = self.fusion_stage(x, t, cond, generator)
            x = self.refine(x, t, cond, generator)
        return x


def reference_prompt(prompt: str, identifier: str, class_noun: str) -> str:
    """C̃: the prompt with the class noun in the identifier's place ("a [V] dog" -> "a dog")."""
    words = prompt.split()
    out = []
    for i, w in enumerate(words):
        if w != identifier:
            out.append(w)
        elif i + 1 >= len(words) or words[i + 1] != class_noun.split()[0]:
            out.append(class_noun)
    return " ".join(out)


class FusionPipeline:
    """Fusion Sampling over a stock Stable Diffusion pipeline's modules (an expert's LoRA
    applied or not). ``subject`` supplies S* per step for ProFusion experts
    (:class:`dreamfleet.core.profusion.PromptNetSubject`); without it the identifier's own
    tokens are the subject (a DreamBooth expert)."""

    def __init__(self, pipe, *, identifier: str, class_noun: str, subject: Any = None):
        from dreamfleet.core.identifiers import token_ids

        self.pipe, self.identifier, self.class_noun, self.subject = pipe, identifier, class_noun, subject
        self.subject_ids = torch.tensor(token_ids(pipe.tokenizer, identifier))

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def ids(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(self.device)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pipe.text_encoder(ids)[0]

    def conditioning(self, prompts: list[str], p: FusionParams, latent_side: int) -> Conditioning:
        """∅, C̃ (once), and C / C^γ (fixed, or from PromptNet at every step)."""
        n = len(prompts)
        if self.subject is not None:
            prompts = [self.subject.expand(q, latent_side) for q in prompts]
        ids = self.ids(prompts)
        mask = torch.isin(ids, self.subject_ids.to(ids.device))  # a prompt without the subject: plain guidance
        uncond = self.encode(self.ids([""] * n))
        ref = None
        if p.guidance_scale_ref:
            ref = self.encode(self.ids([reference_prompt(q, self.identifier, self.class_noun) for q in prompts]))
        if self.subject is not None:
            return self.subject.conditioning(self, ids, mask, uncond, ref, p.refine_emb_scale)
        cond = self.encode(ids)
        return StaticConditioning(uncond, cond, scale_positions(cond, mask, p.refine_emb_scale), ref)

    def to(self, device) -> FusionPipeline:
        self.pipe.to(device)
        if self.subject is not None:
            self.subject.to(device)
        return self

    def set_progress_bar_config(self, **kw) -> None:
        self.pipe.set_progress_bar_config(**kw)

    @property
    def native_resolution(self) -> int:
        pipe = self.pipe
        return getattr(pipe, "native_resolution", None) or pipe.unet.config.sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], *, params: FusionParams | None = None, num_inference_steps=None,
                 guidance_scale=None, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, generator=None, latents=None, output_type: str = "pil", **fusion):
        """As the stock pipeline's call (``num_inference_steps``, ``guidance_scale`` = w1, a
        generator or one per image; returns an output with ``.images``), plus every
        :class:`FusionParams` field by name or as ``params``."""
        from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
        from diffusers.utils.torch_utils import randn_tensor

        stock = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        p = dataclasses.replace(params or FusionParams(), **{k: v for k, v in {**stock, **fusion}.items()
                                                            if v is not None})
        prompts = [q for q in ([prompt] if isinstance(prompt, str) else prompt) for _ in range(num_images_per_prompt)]
        pipe, side = self.pipe, self.native_resolution
        shape = (len(prompts), pipe.unet.config.in_channels, (height or side) // pipe.vae_scale_factor,
                 (width or side) // pipe.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=pipe.text_encoder.dtype)
        cond = self.conditioning(prompts, p, latents.shape[-1])
        try:
            x = FusionSampler(pipe.unet, dict(pipe.scheduler.config), p).sample(latents.to(self.device), cond,
                                                                                generator)
        finally:
            getattr(cond, "close", lambda: None)()
        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=x, nsfw_content_detected=None)
        image = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        images = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=[True] * len(prompts))
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
