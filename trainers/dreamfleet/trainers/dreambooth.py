"""DreamBooth (Ruiz et al., CVPR 2023) for one subject.

Fine-tunes a text-to-image model on "a [V] [class noun]" with the subject's 3-5 photos,
plus the class-specific prior-preservation loss on the frozen model's own "a [class noun]"
images: ``loss = mse(instance) + lambda * mse(class)``. The result is an expert folder
(see :mod:`dreamfleet.core.expert`), written atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from dreamfleet.core.artifacts import atomic_dir, write_json
from dreamfleet.core.config import to_dict
from dreamfleet.core.devices import resolve_device
from dreamfleet.core.errors import ConfigError, DataError
from dreamfleet.core.expert import EXPERT_FILE, ExpertInfo
from dreamfleet.core.families import Cond, NoisyBatch, cat_cond
from dreamfleet.core.families.base import DDPMFamily
from dreamfleet.core.hashing import sha256_bytes
from dreamfleet.core.identifiers import check_class_noun, check_identifier, choose_identifier
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.images import image_grid
from dreamfleet.core.models import BaseModel, load_base
from dreamfleet.core.version import code_version
from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.loop import LoopResult, LoopSettings, step_generator
from dreamfleet.trainers.lora import LoraWeights, add_lora, save_lora, write_lora

log = logging.getLogger("dreamfleet")


@dataclass
class SubjectData:
    """One subject's photos (already normalised to RGB) and what is known about it."""

    subject_id: str
    class_noun: str
    images: list[Image.Image]
    identifier: str | None = None
    tenant: str | None = None
    source: str | None = None
    image_names: list[str] | None = None
    captions: list[str | None] | None = None  # one per image (given only when a run trains on captions)
    prompts: list[str] | None = None  # evaluation prompt templates (the manifest's), for best-step selection
    masks: list[Image.Image | None] | None = None  # one per image, 8-bit grey (given only for masked loss)

    def input_hash(self) -> str:
        """Hash of the normalised pixels (and of each one's caption and mask when there are
        any), independent of file names and encodings."""
        n = len(self.images)
        captions = self.captions if self.captions and any(self.captions) else [None] * n
        masks = self.masks if self.masks and any(m is not None for m in self.masks) else [None] * n
        parts = [sha256_bytes(f"{im.size}".encode() + im.tobytes() + (f"\0{c}".encode() if c else b"")
                              + (b"\0mask" + m.tobytes() if m is not None else b""))
                 for im, c, m in zip(self.images, captions, masks, strict=True)]
        return sha256_bytes("\n".join(sorted(parts)).encode())


# --------------------------------------------------------------------------- devices and precision


def resolve_precision(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast / frozen-weight dtype, or None for full fp32."""
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


# --------------------------------------------------------------------------- data preparation


def image_to_tensor(img: Image.Image, resolution: int | tuple[int, int], *, center_crop: bool, flip: bool,
                    g: torch.Generator, sizes: list[tuple[int, int, int, int]] | None = None,
                    mask: Image.Image | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Resize to cover ``resolution`` (a side, or an aspect bucket's (width, height)), crop it,
    scale to [-1, 1]; returns (3, H, W). ``sizes`` gets (original height, width, crop top,
    left): SDXL's micro-conditioning. With a ``mask`` (8-bit grey at the image's size) returns
    it too, as (1, H, W) in [0, 1], resized, cropped and flipped with the image."""
    tw, th = (resolution, resolution) if isinstance(resolution, int) else resolution
    w0, h0 = img.size
    scale = max(tw / w0, th / h0)
    size = (max(tw, round(w0 * scale)), max(th, round(h0 * scale)))
    img = img.resize(size, Image.BILINEAR)
    w, h = img.size
    if center_crop:
        left, top = (w - tw) // 2, (h - th) // 2
    else:
        left = int(torch.randint(0, w - tw + 1, (1,), generator=g))
        top = int(torch.randint(0, h - th + 1, (1,), generator=g))
    box = (left, top, left + tw, top + th)
    img = img.crop(box)
    flipped = flip and bool(torch.rand(1, generator=g) < 0.5)
    if flipped:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if sizes is not None:
        sizes.append((h0, w0, top, left))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(th, tw, 3)
    x = x.permute(2, 0, 1).float().div(127.5).sub(1.0)
    if mask is None:
        return x
    m = mask.resize(size, Image.BILINEAR).crop(box)
    m = m.transpose(Image.FLIP_LEFT_RIGHT) if flipped else m
    return x, torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).reshape(1, th, tw) / 255.0


def aspect_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(width, height) buckets of at most ``resolution``² pixels, sides multiples of ``step``,
    aspect ratios up to ``max_ratio`` (kohya's bucket rule), the square one included."""
    area, out = resolution * resolution, {(resolution // step * step,) * 2}
    for w in range(step, int(resolution * max_ratio) + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= max_ratio:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio; the larger bucket on a tie)."""
    w, h = size
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - math.log(w / h)), -b[0] * b[1]))


def check_prompt_length(base: BaseModel, prompt: str, what: str) -> None:
    for tokenizer, limit in base.kind.prompt_tokens(base):
        n = len(tokenizer(prompt).input_ids)
        if n > limit:
            raise ConfigError(f"{what} {prompt!r} is {n} tokens, over the text encoder's limit of {limit}; shorten it")


@dataclass
class DreamBoothBatch:
    """One micro-batch of denoiser inputs and targets (instance samples first, then class samples)."""

    noisy: NoisyBatch  # noisy latents, timesteps, target, loss weighting
    cond: Cond  # text conditioning, one row per sample
    prior: bool  # the second half is class samples for the prior-preservation loss
    mask: torch.Tensor | None = None  # (B, 1, H, W) pixel masks of the instance samples (masked loss)

    @property
    def size(self) -> int:
        return self.noisy.noisy.shape[0]


@dataclass
class Pixels:
    """Training images of one size as a tensor, with each one's (orig h, w, crop top, left)."""

    bchw: torch.Tensor
    sizes: torch.Tensor  # (N, 4) long
    masks: torch.Tensor | None = None  # (N, 1, H, W) in [0, 1]: each photo's loss weight per pixel
    ids: torch.Tensor | None = None  # each image's index among the subject's photos (an aspect bucket's)

    def __len__(self) -> int:
        return len(self.bchw)

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.bchw.shape[-2]), int(self.bchw.shape[-1])


def to_pixels(images: list[Image.Image], resolution: int | tuple[int, int], *, center_crop: bool, flip: bool,
              g: torch.Generator, masks: list[Image.Image | None] | None = None) -> Pixels:
    """The images as one tensor at ``resolution`` (a side, or (width, height)); with ``masks``
    (a photo without one weighs every pixel) their masks too."""
    sizes: list[tuple[int, int, int, int]] = []
    if masks is None:
        bchw = torch.stack([image_to_tensor(im, resolution, center_crop=center_crop, flip=flip, g=g, sizes=sizes)
                            for im in images])
        return Pixels(bchw, torch.tensor(sizes, dtype=torch.long))
    pairs = [image_to_tensor(im, resolution, center_crop=center_crop, flip=flip, g=g, sizes=sizes,
                             mask=m if m is not None else Image.new("L", im.size, 255))
             for im, m in zip(images, masks, strict=True)]
    return Pixels(torch.stack([x for x, _ in pairs]), torch.tensor(sizes, dtype=torch.long),
                  torch.stack([m for _, m in pairs]))


def to_bucketed_pixels(images: list[Image.Image], cfg: TrainConfig, g: torch.Generator,
                       masks: list[Image.Image | None] | None = None) -> list[Pixels]:
    """The photos grouped by their nearest aspect bucket, one :class:`Pixels` per bucket used
    (each photo at its bucket's size, nothing padded), in bucket order."""
    if cfg.bucket_step * 2 > cfg.resolution:
        raise ConfigError(f"bucket_step {cfg.bucket_step} is too coarse for resolution {cfg.resolution}: pass a "
                          f"--bucket-step of at most {cfg.resolution // 2} (a multiple of 8 that the denoiser takes)")
    buckets = aspect_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect_ratio)
    chosen = [nearest_bucket(im.size, buckets) for im in images]
    out = []
    for bucket in sorted(set(chosen)):
        ids = [i for i, b in enumerate(chosen) if b == bucket]
        px = to_pixels([images[i] for i in ids], bucket, center_crop=cfg.center_crop, flip=cfg.random_flip, g=g,
                       masks=[masks[i] for i in ids] if masks is not None else None)
        out.append(replace(px, ids=torch.tensor(ids)))
    return out


class DreamBoothObjective:
    """Batch -> loss for DreamBooth with optional prior preservation, for any model family
    (the family encodes prompts, noises latents, calls its denoiser: :mod:`dreamfleet.core.families`)."""

    def __init__(self, base: BaseModel, cfg: TrainConfig, instance: Pixels | list[Pixels],
                 klass: Pixels | list[Pixels] | None, instance_prompt: str, class_prompt: str, device: torch.device,
                 weight_dtype: torch.dtype, rank: int = 0, instance_prompts: list[str] | None = None):
        self.base, self.kind, self.cfg, self.device, self.rank = base, base.kind, cfg, device, rank
        self.vae, self.denoiser = base.vae, base.denoiser
        # The module called in forward; a distributed runtime replaces it with its DDP wrapper.
        self.forward_unet = base.denoiser
        self.weight_dtype = weight_dtype
        # one Pixels per aspect bucket (one in all without bucketing); the class images' per bucket too
        self.buckets = instance if isinstance(instance, list) else [instance]
        self.class_buckets = (klass if isinstance(klass, list) else [klass]) if klass is not None else None
        # one prompt for every photo, or one per photo (its caption)
        self.instance_prompts = instance_prompts or [instance_prompt]
        self.instance_ids = self.kind.tokenize(base, self.instance_prompts, device)
        self.class_ids = self.kind.tokenize(base, [class_prompt], device)
        self.inst_dist = self.class_dist = None
        if cfg.cache_latents:  # per bucket
            self.inst_dist = [self._encode_dist(b.bchw) for b in self.buckets]
            self.class_dist = [self._encode_dist(b.bchw) for b in self.class_buckets] if klass is not None else None
        self.inst_emb = self.class_emb = None
        if not cfg.train_text_encoder:
            with torch.no_grad():
                self.inst_emb = {k: v.float() for k, v in self.kind.encode(base, self.instance_ids).items()}
                self.class_emb = {k: v.float() for k, v in self.kind.encode(base, self.class_ids).items()}

    @classmethod
    def from_prepared(cls, p: PreparedSubject, rank: int = 0) -> DreamBoothObjective:
        """The objective of a prepared subject (what every trainer, runtime and benchmark builds)."""
        return cls(p.base, p.cfg, p.instance, p.klass, p.instance_prompt, p.class_prompt, p.device,
                   p.weight_dtype, rank=rank, instance_prompts=p.instance_prompts)

    @torch.no_grad()
    def _encode_dist(self, pixels_bchw: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for i in range(0, len(pixels_bchw), chunk):
            x = pixels_bchw[i:i + chunk].to(self.device, self.weight_dtype)
            dist = self.vae.encode(x).latent_dist
            means.append(dist.mean.float().cpu())
            stds.append(dist.std.float().cpu())
        return torch.cat(means), torch.cat(stds)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods = {"unet": self.base.denoiser}
        if self.cfg.train_text_encoder:
            mods.update(self.base.text_encoders)
        return mods

    def _latents(self, idx: torch.Tensor, pixels: Pixels, dist, g: torch.Generator) -> torch.Tensor:
        """VAE latents of the chosen images, sampled from the latent distribution (as diffusers does)."""
        if dist is not None:
            mean, std = dist[0][idx], dist[1][idx]
        else:
            with torch.no_grad():
                d = self.vae.encode(pixels.bchw[idx].to(self.device, self.weight_dtype)).latent_dist
            mean, std = d.mean.float().cpu(), d.std.float().cpu()
        eps = torch.randn(mean.shape, generator=g)
        return self.kind.latents(self.base, mean + std * eps).to(self.device)

    def _cond(self, idx: torch.Tensor, prior: bool, sizes: torch.Tensor, hw: tuple[int, int]) -> Cond:
        """The text conditioning of the chosen photos (each its own caption's, or the one
        instance prompt's), then of as many class images."""
        bs = len(idx)
        rows = idx if len(self.instance_prompts) > 1 else torch.zeros_like(idx)
        if self.cfg.train_text_encoder:
            ids = {k: torch.cat([v[rows]] + ([self.class_ids[k]] * bs if prior else []))
                   for k, v in self.instance_ids.items()}
            cond = self.kind.encode(self.base, ids)
        else:
            inst = {k: v[rows.to(v.device)] for k, v in self.inst_emb.items()}
            cond = cat_cond([inst] + ([self.class_emb] * bs if prior else []))
        cond = self.kind.micro_conditioning(cond, sizes, hw)
        return {k: v.to(self.device) for k, v in cond.items()}

    def _bucket(self, g: torch.Generator) -> int:
        """The aspect bucket of a batch, drawn in proportion to its photos (no draw with one bucket)."""
        if len(self.buckets) == 1:
            return 0
        return int(torch.multinomial(torch.tensor([float(len(b)) for b in self.buckets]), 1, generator=g))

    def batch(self, step: int, micro_step: int) -> DreamBoothBatch:
        """The denoiser's inputs and targets for (step, micro_step): instance images of one aspect
        bucket, then as many class images (at that bucket's size) with prior preservation; data
        order, noise and timesteps from (seed, step)."""
        cfg = self.cfg
        g = step_generator(cfg.seed, step, stream=micro_step * 1024 + self.rank)
        bs, b = cfg.batch_size, self._bucket(g)
        inst = self.buckets[b]
        idx = torch.randint(len(inst), (bs,), generator=g)
        latents = [self._latents(idx, inst, self.inst_dist[b] if self.inst_dist else None, g)]
        sizes = [inst.sizes[idx]]
        prior = cfg.with_prior_preservation and self.class_buckets is not None
        if prior:
            cb = b if len(self.class_buckets) > 1 else 0
            klass = self.class_buckets[cb]
            cidx = torch.randint(len(klass), (bs,), generator=g)
            latents.append(self._latents(cidx, klass, self.class_dist[cb] if self.class_dist else None, g))
            sizes.append(klass.sizes[cidx])
        latents_bchw = torch.cat(latents)
        noise_bchw = torch.randn(latents_bchw.shape, generator=g)
        if cfg.noise_offset:  # one offset per image and channel (the draw only happens when on)
            noise_bchw = noise_bchw + cfg.noise_offset * torch.randn(*latents_bchw.shape[:2], 1, 1, generator=g)
        noise_bchw = noise_bchw.to(self.device)
        noisy = self.kind.noisy_batch(self.base, cfg, latents_bchw, noise_bchw, g)
        mask = inst.masks[idx] if cfg.masked_loss and inst.masks is not None else None
        photos = inst.ids[idx] if inst.ids is not None else idx
        return DreamBoothBatch(noisy, self._cond(photos, prior, torch.cat(sizes), inst.hw), prior, mask)

    def loss_terms(self, pred_bchw: torch.Tensor, batch: DreamBoothBatch) -> dict[str, torch.Tensor]:
        """``loss = mse(instance) + prior_loss_weight * mse(class)`` of the denoiser's prediction
        (each MSE weighted per sample where the family's scheme weights it)."""
        target, weighting = batch.noisy.target, batch.noisy.weighting
        mask = None
        if batch.mask is not None:  # the photo's mask at the latents' size (area-averaged)
            mask = F.interpolate(batch.mask.float(), size=target.shape[-2:], mode="area").to(target.device)
        if batch.prior:
            halves = zip(pred_bchw.chunk(2), target.chunk(2),
                         weighting.chunk(2) if weighting is not None else (None, None), (mask, None), strict=True)
            loss_instance, loss_prior = (weighted_mse(p, t, w, m) for p, t, w, m in halves)
            loss = loss_instance + self.cfg.prior_loss_weight * loss_prior
            return {"loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior}
        loss = weighted_mse(pred_bchw, target, weighting, mask)
        return {"loss": loss, "loss_instance": loss}

    def predict(self, batch: DreamBoothBatch) -> torch.Tensor:
        return self.kind.predict(self.forward_unet, batch.noisy, batch.cond, self.cfg)

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.batch(step, micro_step)
        terms = self.loss_terms(self.predict(b), b)
        return terms["loss"], {k: v.item() for k, v in terms.items()}


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weighting: torch.Tensor | None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """``F.mse_loss``, or diffusers' per-sample weighted mean for flow-matching families; a
    ``mask`` (B, 1, h, w) weighs each latent pixel (0: no loss there), as kohya's masked loss."""
    if weighting is None and mask is None:
        return F.mse_loss(pred.float(), target.float())
    err = (pred.float() - target.float()) ** 2
    if weighting is not None:
        err = weighting.float() * err
    if mask is not None:
        err = mask * err
    return err.reshape(target.shape[0], -1).mean(1).mean()


# --------------------------------------------------------------------------- the trainer


@dataclass
class PreparedSubject:
    """Everything resolved before the loop: what the distributed runtime also needs."""

    subject: SubjectData
    base: BaseModel
    cfg: TrainConfig  # resolved
    identifier: str
    instance_prompt: str
    class_prompt: str
    class_images: dict | None
    instance: Pixels | list[Pixels]  # one per aspect bucket with aspect_buckets
    klass: Pixels | list[Pixels] | None  # the class images, with prior preservation (per bucket too)
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    instance_prompts: list[str] | None = None  # one per photo when it trains on captions


def caption_prompts(subject: SubjectData, instance_prompt: str, fill: dict[str, str]) -> list[str] | None:
    """Each photo's caption with ``{identifier}`` and ``{class_noun}`` filled in (the instance
    prompt for a photo without one), or None when the subject has no captions."""
    if not subject.captions or not any(subject.captions):
        return None
    if len(subject.captions) != len(subject.images):
        raise DataError(f"subject {subject.subject_id!r}: {len(subject.captions)} captions for "
                        f"{len(subject.images)} photos")
    prompts = []
    for caption in subject.captions:
        text = caption or instance_prompt
        for key, value in fill.items():
            text = text.replace("{" + key + "}", value)
        prompts.append(" ".join(text.split()))
    return prompts


def subject_masks(subject: SubjectData) -> list[Image.Image | None]:
    """The subject's masks for masked loss (a photo without one weighs every pixel); refused when none has one."""
    masks = subject.masks or []
    if not any(m is not None for m in masks):
        raise DataError(f"subject {subject.subject_id!r}: masked_loss is on but none of its photos has a mask; put "
                        "NN.mask.png (white = subject) beside NN.jpg and rebuild the manifest, or drop --masked-loss")
    if len(masks) != len(subject.images):
        raise DataError(f"subject {subject.subject_id!r}: {len(masks)} masks for {len(subject.images)} photos")
    for i, (im, m) in enumerate(zip(subject.images, masks, strict=True)):
        if m is not None and m.size != im.size:
            raise DataError(f"subject {subject.subject_id!r}: photo {i} is {im.size[0]}x{im.size[1]} px and its mask "
                            f"{m.size[0]}x{m.size[1]} px; give the mask at the photo's size")
    return masks


def prepare_subject(
    subject: SubjectData,
    base: BaseModel | str,
    cfg: TrainConfig,
    *,
    class_cache: ClassImageCache | None = None,
) -> PreparedSubject:
    """Validate inputs, choose the identifier, fetch class images and build the pixel tensors."""
    validate_subject_id(subject.subject_id)
    class_noun = check_class_noun(subject.class_noun, subject=subject.subject_id)
    if not subject.images:
        raise DataError(f"subject {subject.subject_id!r}: no images")
    base = load_base(base) if isinstance(base, str) else base
    cfg = cfg.resolve(native_resolution=base.resolution)
    check_family_supports(base, cfg)
    if subject.identifier:
        identifier = check_identifier(base.tokenizer, subject.identifier)
    else:
        identifier = choose_identifier(base.tokenizer, subject.subject_id)
    fill = {"identifier": identifier, "class_noun": class_noun}
    instance_prompt = cfg.instance_prompt.format(**fill)
    class_prompt = cfg.class_prompt.format(**fill)
    check_prompt_length(base, instance_prompt, "instance prompt")
    instance_prompts = caption_prompts(subject, instance_prompt, fill) if cfg.captions else None
    for i, prompt in enumerate(instance_prompts or []):
        check_prompt_length(base, prompt, f"caption of photo {i} of subject {subject.subject_id!r}")
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.mixed_precision, device)

    g = step_generator(cfg.seed, 0, stream=99)
    masks = subject_masks(subject) if cfg.masked_loss else None
    if cfg.aspect_buckets:
        instance = to_bucketed_pixels(subject.images, cfg, g, masks)
    else:
        instance = to_pixels(subject.images, cfg.resolution, center_crop=cfg.center_crop, flip=cfg.random_flip, g=g,
                             masks=masks)
    klass, class_meta = None, None
    if cfg.with_prior_preservation:
        cache = class_cache or ClassImageCache()
        req = ClassImageRequest.for_config(cfg, class_prompt)
        base.denoiser.to(device)
        got = cache.ensure(base, req, device=device)
        photos = [Image.open(p).convert("RGB") for p in got.paths]
        klass = ([to_pixels(photos, b.hw[::-1], center_crop=True, flip=False, g=g) for b in instance]
                 if cfg.aspect_buckets else to_pixels(photos, cfg.resolution, center_crop=True, flip=False, g=g))
        class_meta = {"cache_key": got.key, "folder": str(got.folder), "count": len(got.paths), "generated": got.generated}
    return PreparedSubject(
        subject=subject, base=base, cfg=cfg, identifier=identifier, instance_prompt=instance_prompt,
        class_prompt=class_prompt, class_images=class_meta, instance=instance, klass=klass,
        device=device, weight_dtype=dtype or torch.float32, autocast_dtype=dtype, instance_prompts=instance_prompts,
    )


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device`` and cast it to ``dtype`` (the cast only when it differs)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def check_family_supports(base: BaseModel, cfg: TrainConfig) -> None:
    """Refuse what the base model's family cannot train here, saying why."""
    support = base.kind.support
    if cfg.method == "full" and support.full != "yes":
        raise ConfigError(f"base model {base.spec!r} ({base.kind.title}): method=full is not supported ({support.full}); "
                          "use method=lora")
    if cfg.train_text_encoder and support.text_encoder_lora != "yes":
        raise ConfigError(f"base model {base.spec!r} ({base.kind.title}): train_text_encoder is not supported "
                          f"({support.text_encoder_lora})")
    if cfg.snr_gamma and not isinstance(base.kind, DDPMFamily):
        raise ConfigError(f"base model {base.spec!r} ({base.kind.title}) is trained on rectified flow: snr_gamma "
                          "(min-SNR weighting) is for DDPM families; use --weighting-scheme (e.g. logit_normal)")


def setup_frozen(p: PreparedSubject) -> None:
    """Freeze the VAE, and the text encoders unless they are trained; move them to the device in the weight dtype."""
    frozen = [p.base.vae] + ([] if p.cfg.train_text_encoder else list(p.base.text_encoders.values()))
    for module in frozen:
        module.requires_grad_(False)
        place_module(module, p.device, p.weight_dtype)


def quantize_frozen(p: PreparedSubject) -> None:
    """With ``quantize_base=nf4``: the frozen denoiser's linear layers in 4-bit NormalFloat."""
    if p.cfg.quantize_base == "nf4":
        from dreamfleet.trainers.quantize import quantize_nf4

        n = quantize_nf4(p.base.denoiser, p.weight_dtype, p.device)
        log.info("%s: %d linear layers of the frozen %s in NF4", p.subject.subject_id, n, p.base.kind.denoiser)


def _make_trainable(module: torch.nn.Module, p: PreparedSubject, targets, seed: int, *,
                    quantize: bool = False) -> None:
    """LoRA adapters on ``targets`` (method=lora; on the NF4 base with ``quantize`` and
    quantize_base=nf4), or every weight unfrozen in fp32 (full)."""
    if p.cfg.method == "lora":
        place_module(module, p.device, p.weight_dtype)
        if quantize:
            quantize_frozen(p)
        add_lora(module, p.cfg.lora_rank, p.cfg.lora_alpha, list(targets), seed=seed, use_dora=p.cfg.use_dora)
    else:
        module.requires_grad_(True)
        place_module(module, p.device, torch.float32)


def setup_trainable(p: PreparedSubject) -> None:
    """Freeze what is frozen, add LoRA adapters or unfreeze the denoiser (and the text encoders
    when they are trained), move to the device."""
    cfg, base, kind = p.cfg, p.base, p.base.kind
    setup_frozen(p)
    _make_trainable(base.denoiser, p, kind.lora_targets, cfg.seed, quantize=True)
    trained = list(base.text_encoders.values()) if cfg.train_text_encoder else []
    for i, encoder in enumerate(trained):
        _make_trainable(encoder, p, kind.text_encoder_lora_targets, cfg.seed + 1 + i)
        encoder.train()
    # Trainable parameters stay fp32 (master weights) whatever the frozen weights' dtype.
    for module in (base.denoiser, *trained):
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        for encoder in trained:
            encoder.gradient_checkpointing_enable()
    base.denoiser.train()


def free_text_encoders(p: PreparedSubject) -> None:
    """Once the prompts are encoded (the objective caches them), the frozen text encoders (T5
    included) leave the accelerator, as diffusers' Flux script frees them; validation brings
    them back for its renders (:func:`text_encoders_on`)."""
    if p.cfg.free_text_encoders and not p.cfg.train_text_encoder and p.device.type != "cpu":
        for module in p.base.text_encoders.values():
            module.to("cpu")
        if p.device.type == "cuda":
            torch.cuda.empty_cache()


@contextlib.contextmanager
def text_encoders_on(p: PreparedSubject) -> Iterator[None]:
    """The text encoders on the training device for the duration (validation renders)."""
    away = [m for m in p.base.text_encoders.values() if next(m.parameters()).device != p.device]
    for module in away:
        module.to(p.device)
    try:
        yield
    finally:
        for module in away:
            module.to("cpu")


def loop_settings(p: PreparedSubject, *, progress: bool = True) -> LoopSettings:
    """The loop takes the subject's config as its optimizer and loop sections."""
    return LoopSettings(p.cfg, p.cfg, autocast_dtype=p.autocast_dtype, device=p.device, progress=progress,
                        description=f"dreambooth {p.subject.subject_id}")


def save_validation_grid(p: PreparedSubject, work: Path, step: int, *, write: bool = True) -> None:
    """The validation images at ``step`` as one grid (a row per prompt) in ``work/validation``.
    Every rank renders them (under ZeRO-3 forward passes are collective); ``write`` ranks save."""
    images = validation_images(p)
    if write:
        grid = image_grid(images, rows=len(p.cfg.validation_prompts), cols=p.cfg.num_validation_images)
        grid.save(work / "validation" / f"step-{step:08d}.png")


@torch.no_grad()
def validation_images(p: PreparedSubject, prompts: list[str] | None = None, *, seed: int | None = None,
                      n: int | None = None, steps: int | None = None,
                      guidance_scale: float | None = None) -> list[Image.Image]:
    """Images of the current (partly trained) model, a row of ``n`` (default
    ``num_validation_images``) per prompt; image j of prompt i has noise seed
    ``seed + 1000 i + j``, the same at every step."""
    cfg = p.cfg
    n, steps = n or cfg.num_validation_images, steps or cfg.validation_inference_steps
    fill = {"identifier": p.identifier, "class_noun": p.subject.class_noun}
    prompts = [t.format(**fill) for t in (prompts or cfg.validation_prompts)]
    pipe = p.base.pipeline()
    denoiser = p.base.denoiser
    was_training = denoiser.training
    denoiser.eval()
    images = []
    gen_device = p.device if p.device.type == "cuda" else "cpu"
    guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator(gen_device).manual_seed((seed if seed is not None else cfg.seed) + 1000 * i + j)
                for j in range(n)]
        with text_encoders_on(p), torch.autocast(p.device.type, dtype=p.autocast_dtype, enabled=p.autocast_dtype is not None):
            images += pipe([prompt] * n, height=cfg.resolution, width=cfg.resolution, num_inference_steps=steps,
                           generator=gens, **guidance).images
    denoiser.train(was_training)
    return images


@dataclass
class TrainResult:
    expert_dir: Path
    info: ExpertInfo
    loop: LoopResult


def work_dir_for(out_dir: Path) -> Path:
    """Checkpoints and validation images of an unfinished run live beside the expert folder."""
    return out_dir.parent / f".{out_dir.name}.work"


def publish_expert(
    p: PreparedSubject,
    result: LoopResult,
    out_dir: Path,
    work: Path,
    *,
    wall_time_s: float,
    overwrite: bool,
    unet_state: dict[str, torch.Tensor] | None = None,
    unet_lora: LoraWeights | None = None,
    extra_stats: dict | None = None,
    selection: dict | None = None,
) -> ExpertInfo:
    """Write the expert folder atomically: weights, expert.json, validation grids, instance photos.

    ``unet_state``: the consolidated full UNet state dict, when the module itself holds only a
    shard (DeepSpeed ZeRO-3). ``unet_lora``: the subject's UNet adapter, when the UNet holds
    several subjects' adapters (multi-subject packing) rather than one PEFT adapter.
    """
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        weights = _write_weights(tmp, p, unet_state, unet_lora)
        if (work / "validation").is_dir():
            shutil.copytree(work / "validation", tmp / "validation")
        (tmp / "instance").mkdir()
        for i, im in enumerate(p.subject.images):
            thumb = im.copy()
            thumb.thumbnail((256, 256))
            thumb.save(tmp / "instance" / f"{i:02d}.png")
        info = _expert_info(p, result, weights, wall_time_s, extra_stats)
        info.selection = selection
        write_json(tmp / "loss_history.json", result.history)
        write_json(tmp / EXPERT_FILE, info.to_dict())
    return info


def _write_weights(tmp: Path, p: PreparedSubject, unet_state, unet_lora: LoraWeights | None) -> list[str]:
    """The trained weights into the expert folder being written; returns what it holds."""
    cfg, base = p.cfg, p.base
    if unet_lora is not None:
        write_lora(tmp, {base.kind.denoiser: unet_lora}, base.kind)
        return ["pytorch_lora_weights.safetensors"]
    if cfg.method == "lora":
        save_lora(tmp, base, text_encoders=cfg.train_text_encoder, denoiser_state=unet_state)
        return ["pytorch_lora_weights.safetensors"]
    name = base.kind.denoiser
    if unet_state is not None:
        full = type(base.denoiser).from_config(base.denoiser.config)
        full.load_state_dict({k: v.float() for k, v in unet_state.items()})
        full.save_pretrained(tmp / name, safe_serialization=True)
        return [name]
    base.denoiser.save_pretrained(tmp / name, safe_serialization=True)
    encoders = base.text_encoders if cfg.train_text_encoder else {}
    for encoder, module in encoders.items():
        module.save_pretrained(tmp / encoder, safe_serialization=True)
    return [name, *encoders]


def _expert_info(p: PreparedSubject, result: LoopResult, weights: list[str], wall_time_s: float,
                 extra_stats: dict | None) -> ExpertInfo:
    history = result.history
    return ExpertInfo(
        subject_id=p.subject.subject_id,
        class_noun=p.subject.class_noun,
        identifier=p.identifier,
        instance_prompt=p.instance_prompt,
        method=p.cfg.method,
        base_model=p.base.describe,
        config=to_dict(p.cfg),
        code_version=code_version(),
        input_hash=p.subject.input_hash(),
        num_images=len(p.subject.images),
        final_loss=result.final_loss,
        wall_time_s=round(wall_time_s, 3),
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        weights=weights,
        class_images=p.class_images,
        tenant=p.subject.tenant,
        source=p.subject.source,
        train_stats={
            "steps": result.final_step,
            "resumed_from": result.resumed_from,
            "step_time_s": round(result.step_time_s, 3),
            "loss_first": history[0]["loss"] if history else None,
            "device": str(p.device),
            "precision": str(p.autocast_dtype).replace("torch.", "") if p.autocast_dtype else "fp32",
            **({"cuda_peak_allocated_mb": round(torch.cuda.max_memory_allocated(p.device) / 2**20, 1)}
               if p.device.type == "cuda" else {}),
            **(extra_stats or {}),
        },
    )
