"""What every model family says about itself, and the two training targets they share.

A family (one module per family in this package) is a :class:`Family` instance. It knows:

- its components and how they load from a diffusers folder (and which ``model_index.json``
  pipeline classes it recognises);
- how prompts become the denoiser's conditioning (one, two or three text encoders);
- the training target: DDPM noise/v-prediction (UNets) or rectified-flow velocity (DiTs);
- conditioning extras (SDXL's micro-conditioning, Flux's packed latents and position ids);
- its LoRA targets and the diffusers pipeline class that builds, saves and loads it.

The trainers, serving and evaluation call these methods and never test a family's name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamfleet.core.errors import ModelError

# A dreamfleet.core.models.BaseModel (not imported: models imports the families).
BaseModel = Any

Cond = dict[str, torch.Tensor]  # the denoiser's text conditioning, every tensor with a batch dim


def pick_variant(folder: Path, subfolder: str) -> dict[str, Any]:
    """Prefer safetensors; use the fp16 variant only when it is the sole one present."""
    sub = folder / subfolder
    names = {p.name for p in sub.iterdir()} if sub.is_dir() else set()
    plain = any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names)
    if not plain and any(".fp16." in n for n in names):
        return {"variant": "fp16"}
    return {}


def diffusers_class(name: str) -> Any:
    """A class of diffusers or transformers by name (the import deferred, as diffusers does)."""
    for package in ("diffusers", "transformers"):
        module = importlib.import_module(package)
        if hasattr(module, name):
            return getattr(module, name)
    raise ModelError(f"neither diffusers nor transformers has a class {name!r}; upgrade them")


@dataclass
class NoisyBatch:
    """What the denoiser is given and what it should predict, for one micro-batch."""

    noisy: torch.Tensor  # (B, C, H, W) latents, the family packs them if it must
    timesteps: torch.Tensor  # (B,) in the denoiser's own units
    target: torch.Tensor  # (B, C, H, W)
    weighting: torch.Tensor | None = None  # (B, 1, 1, 1) loss weights; None: plain MSE
    sigmas: torch.Tensor | None = None  # (B, 1, 1, 1) flow-matching noise levels


@dataclass(frozen=True)
class Support:
    """What the platform can do with a family ("yes", or why not)."""

    full: str = "yes"
    text_encoder_lora: str = "yes"
    apprentice: str = "no: the apprentice's encoder attaches to a Stable Diffusion 1.x/2.x UNet"
    profusion: str = "no: PromptNet is built from a Stable Diffusion 1.x/2.x UNet's encoder half"


@dataclass(frozen=True)
class Family:
    """A model family: see the module docstring. Subclasses override what differs."""

    name: str
    title: str
    pipeline_class: str  # the stock diffusers pipeline
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values it recognises
    denoiser: str  # "unet" or "transformer"
    components: dict[str, str]  # component -> class loaded from the folder
    text_encoders: tuple[str, ...]
    lora_targets: tuple[str, ...]
    text_encoder_lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    training_scheduler: str = "DDPMScheduler"
    default_resolution: int = 512
    side_multiple: int = 8  # image sides must be multiples of this (VAE scale x the transformer's patch size)
    # The UNet scripts save LoRA keys in diffusers' older format (lora.down/up, through
    # convert_state_dict_to_diffusers); the DiT scripts save PEFT's keys as they are.
    convert_lora_keys: bool = False
    support: Support = field(default_factory=Support)

    # ------------------------------------------------------------------ loading

    def load(self, folder: Path, dtype: torch.dtype | None) -> dict[str, Any]:
        """The components of a diffusers folder of this family, by name, and its training scheduler."""
        for part in (*self.components, "scheduler"):
            if not (folder / part).is_dir():
                raise ModelError(f"{folder}: the '{part}' component folder is missing; is the {self.title} checkout complete?")
        loaded = {name: self._load_component(folder, name, cls, dtype) for name, cls in self.components.items()}
        loaded["noise_scheduler"] = diffusers_class(self.training_scheduler).from_pretrained(folder, subfolder="scheduler")
        return loaded

    @staticmethod
    def _load_component(folder: Path, name: str, cls_name: str, dtype: torch.dtype | None) -> Any:
        cls = diffusers_class(cls_name)
        try:
            if cls_name.endswith(("Tokenizer", "TokenizerFast")):
                return cls.from_pretrained(folder, subfolder=name)
            kw = {"torch_dtype": dtype} if dtype is not None else {}
            return cls.from_pretrained(folder, subfolder=name, **kw, **pick_variant(folder, name)).eval()
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{folder}: cannot load its '{name}' ({cls_name}): {e}") from None

    def native_resolution(self, base: BaseModel) -> int:
        sample = getattr(base.denoiser.config, "sample_size", None)
        if sample:
            return int(sample) * base.vae_scale_factor
        return int(base.extra.get("resolution", self.default_resolution))

    # ------------------------------------------------------------------ pipelines

    def inference_scheduler(self, base: BaseModel) -> Any:
        return type(base.noise_scheduler).from_config(base.noise_scheduler.config)

    def pipeline(self, base: BaseModel, **replace: Any) -> Any:
        """The stock diffusers pipeline over the base's components (or ``replace``'s)."""
        parts = {name: getattr(base, name) for name in self.components}
        unknown = set(replace) - set(parts)
        if unknown:
            raise ModelError(f"{self.title} pipelines have no component {sorted(unknown)}")
        parts.update({k: v for k, v in replace.items() if v is not None})
        pipe = self.pipeline_type()(scheduler=self.inference_scheduler(base), **parts, **self.pipeline_extras())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_type(self) -> type:
        """The pipeline class :meth:`pipeline` builds (the stock one unless the family adapts it)."""
        return diffusers_class(self.pipeline_class)

    def pipeline_extras(self) -> dict[str, Any]:
        return {}

    def save_lora(self, folder: Path, layers: dict[str, dict[str, torch.Tensor]], metadata: dict[str, dict]) -> None:
        """``{component}_lora_layers`` through the family pipeline's ``save_lora_weights``."""
        kwargs: dict[str, Any] = {}
        for component, sd in layers.items():
            kwargs[f"{component}_lora_layers"] = sd
            kwargs[f"{component}_lora_adapter_metadata"] = metadata[component]
        diffusers_class(self.pipeline_class).save_lora_weights(save_directory=str(folder), safe_serialization=True,
                                                                **kwargs)

    # ------------------------------------------------------------------ prompts

    @staticmethod
    def tokenizer(base: BaseModel, encoder: str) -> Any:
        """The tokenizer of a text encoder (``text_encoder_2`` -> ``tokenizer_2``)."""
        return getattr(base, encoder.replace("text_encoder", "tokenizer"))

    def max_length(self, base: BaseModel, encoder: str) -> int:
        return int(self.tokenizer(base, encoder).model_max_length)

    def tokenize(self, base: BaseModel, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """Token ids per text encoder, padded as the family's pipeline pads them."""
        return {e: self.tokenizer(base, e)(prompts, padding="max_length", max_length=self.max_length(base, e),
                                           truncation=True, return_tensors="pt").input_ids.to(device)
                for e in self.text_encoders}

    def prompt_tokens(self, base: BaseModel) -> list[tuple[Any, int]]:
        """(tokenizer, limit) pairs a prompt must fit."""
        return [(self.tokenizer(base, e), self.max_length(base, e)) for e in self.text_encoders]

    def encode(self, base: BaseModel, ids: dict[str, torch.Tensor]) -> Cond:
        raise NotImplementedError

    # ------------------------------------------------------------------ training

    def latents(self, base: BaseModel, sample: torch.Tensor) -> torch.Tensor:
        """VAE latent samples -> the denoiser's latent space."""
        shift = getattr(base.vae.config, "shift_factor", None)
        scale = float(base.vae.config.scaling_factor)
        return sample * scale if shift is None else (sample - shift) * scale

    def noisy_batch(self, base: BaseModel, cfg: Any, latents: torch.Tensor, noise: torch.Tensor,
                    g: torch.Generator) -> NoisyBatch:
        raise NotImplementedError

    def micro_conditioning(self, cond: Cond, sizes: torch.Tensor, target_hw: tuple[int, int]) -> Cond:
        """Per-sample conditioning from each image's (orig_h, orig_w, crop_top, crop_left) and
        the (height, width) it is trained at."""
        return cond

    def predict(self, denoiser: torch.nn.Module, batch: NoisyBatch, cond: Cond, cfg: Any) -> torch.Tensor:
        raise NotImplementedError


def cat_noisy(batches: list[NoisyBatch]) -> NoisyBatch:
    """Concatenate noisy batches along the batch (fields that are set in all of them)."""
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in batches]
        return None if any(p is None for p in parts) else torch.cat(parts)

    return NoisyBatch(cat("noisy"), cat("timesteps"), cat("target"), cat("weighting"), cat("sigmas"))


def cat_cond(conds: list[Cond]) -> Cond:
    """Concatenate conditionings along the batch."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


class DDPMFamily(Family):
    """UNets trained on DDPM noise (or v-) prediction, as diffusers' train_dreambooth scripts."""

    def inference_scheduler(self, base: BaseModel) -> Any:
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler.from_config(base.noise_scheduler.config)

    def noisy_batch(self, base, cfg, latents, noise, g) -> NoisyBatch:
        scheduler = base.noise_scheduler
        n = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        gamma = getattr(cfg, "snr_gamma", None)
        weighting = min_snr_weights(scheduler, timesteps, gamma).view(n, 1, 1, 1) if gamma else None
        return NoisyBatch(noisy, timesteps, target, weighting)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ per-sample loss weights (Hang et al. 2023, §3.4) as diffusers'
    train_text_to_image.py: ``min(SNR, γ) / SNR`` for ε-prediction, ``/ (SNR + 1)`` for v."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, gamma))
    return weights / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)


class FlowFamily(Family):
    """DiTs trained on rectified flow: ``x_t = (1 - σ) x0 + σ noise``, target ``noise - x0``,
    with the timestep sampling and loss weighting of diffusers' SD3/Flux DreamBooth scripts."""

    def noisy_batch(self, base, cfg, latents, noise, g) -> NoisyBatch:
        from diffusers.training_utils import (
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )

        scheduler = base.noise_scheduler
        n = latents.shape[0]
        u = compute_density_for_timestep_sampling(
            weighting_scheme=cfg.weighting_scheme, batch_size=n, logit_mean=cfg.logit_mean,
            logit_std=cfg.logit_std, mode_scale=cfg.mode_scale, generator=g)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(n, 1, 1, 1)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=cfg.weighting_scheme, sigmas=sigmas)
        return NoisyBatch(noisy, timesteps, noise - latents, weighting, sigmas)
