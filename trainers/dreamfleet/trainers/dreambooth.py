"""DreamBooth (Ruiz et al., CVPR 2023) for one subject.

Fine-tunes a text-to-image model on "a [V] [class noun]" with the subject's 3-5 photos,
plus the class-specific prior-preservation loss on the frozen model's own "a [class noun]"
images: ``loss = mse(instance) + lambda * mse(class)``. The result is an expert folder
(see :mod:`dreamfleet.core.expert`), written atomically.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from dreamfleet.core.artifacts import atomic_dir, write_json
from dreamfleet.core.config import to_dict
from dreamfleet.core.devices import resolve_device
from dreamfleet.core.errors import ConfigError, DataError
from dreamfleet.core.expert import EXPERT_FILE, ExpertInfo
from dreamfleet.core.hashing import sha256_bytes
from dreamfleet.core.identifiers import check_class_noun, check_identifier, choose_identifier
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.images import image_grid
from dreamfleet.core.models import BaseModel, load_base
from dreamfleet.core.version import code_version
from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.loop import LoopResult, LoopSettings, step_generator
from dreamfleet.trainers.lora import (
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    LoraWeights,
    add_lora,
    save_lora,
    write_lora,
)

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

    def input_hash(self) -> str:
        """Hash of the normalised pixels, independent of file names and encodings."""
        parts = [sha256_bytes(f"{im.size}".encode() + im.tobytes()) for im in self.images]
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


def image_to_tensor(img: Image.Image, resolution: int, *, center_crop: bool, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, scale to [-1, 1]; returns (3, H, W)."""
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left = int(torch.randint(0, w - resolution + 1, (1,), generator=g))
        top = int(torch.randint(0, h - resolution + 1, (1,), generator=g))
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip and bool(torch.rand(1, generator=g) < 0.5):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


def encode_prompt(tokenizer, text_encoder, prompts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def check_prompt_length(tokenizer, prompt: str, what: str) -> None:
    n = len(tokenizer(prompt).input_ids)
    if n > tokenizer.model_max_length:
        raise ConfigError(
            f"{what} {prompt!r} is {n} tokens, over the text encoder's limit of {tokenizer.model_max_length}; shorten it"
        )


@dataclass
class DreamBoothBatch:
    """One micro-batch of UNet inputs and targets (instance samples first, then class samples)."""

    noisy_bchw: torch.Tensor
    timesteps: torch.Tensor
    cond: torch.Tensor  # text embeddings, one per sample
    target_bchw: torch.Tensor
    prior: bool  # the second half is class samples for the prior-preservation loss

    @property
    def size(self) -> int:
        return self.noisy_bchw.shape[0]


class DreamBoothObjective:
    """Batch -> loss for DreamBooth with optional prior preservation."""

    def __init__(
        self,
        base: BaseModel,
        cfg: TrainConfig,
        instance_bchw: torch.Tensor,
        class_bchw: torch.Tensor | None,
        instance_prompt: str,
        class_prompt: str,
        device: torch.device,
        weight_dtype: torch.dtype,
        rank: int = 0,
    ):
        self.base, self.cfg, self.device, self.rank = base, cfg, device, rank
        self.unet, self.vae, self.text_encoder = base.unet, base.vae, base.text_encoder
        # The module called in forward; a distributed runtime replaces it with its DDP wrapper.
        self.forward_unet = base.unet
        self.scheduler = base.noise_scheduler
        self.weight_dtype = weight_dtype
        self.scaling_factor = float(base.vae.config.scaling_factor)
        self.instance_bchw, self.class_bchw = instance_bchw, class_bchw
        self.instance_ids = self._token_ids(instance_prompt)
        self.class_ids = self._token_ids(class_prompt)
        self.inst_dist = self.class_dist = None
        if cfg.cache_latents:
            self.inst_dist = self._encode_dist(instance_bchw)
            self.class_dist = self._encode_dist(class_bchw) if class_bchw is not None else None
        self.inst_emb = self.class_emb = None
        if not cfg.train_text_encoder:
            with torch.no_grad():
                self.inst_emb = self.text_encoder(self.instance_ids)[0].float()
                self.class_emb = self.text_encoder(self.class_ids)[0].float()

    @classmethod
    def from_prepared(cls, p: PreparedSubject, rank: int = 0) -> DreamBoothObjective:
        """The objective of a prepared subject (what every trainer, runtime and benchmark builds)."""
        return cls(p.base, p.cfg, p.instance_bchw, p.class_bchw, p.instance_prompt, p.class_prompt, p.device,
                   p.weight_dtype, rank=rank)

    def _token_ids(self, prompt: str) -> torch.Tensor:
        tok = self.base.tokenizer
        return tok(
            [prompt], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

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
        mods = {"unet": self.unet}
        if self.cfg.train_text_encoder:
            mods["text_encoder"] = self.text_encoder
        return mods

    def _latents(self, idx: torch.Tensor, pixels: torch.Tensor, dist, g: torch.Generator) -> torch.Tensor:
        """VAE latents of the chosen images, sampled from the latent distribution (as diffusers does)."""
        if dist is not None:
            mean, std = dist[0][idx], dist[1][idx]
        else:
            with torch.no_grad():
                d = self.vae.encode(pixels[idx].to(self.device, self.weight_dtype)).latent_dist
            mean, std = d.mean.float().cpu(), d.std.float().cpu()
        eps = torch.randn(mean.shape, generator=g)
        return ((mean + std * eps) * self.scaling_factor).to(self.device)

    def batch(self, step: int, micro_step: int) -> DreamBoothBatch:
        """The UNet's inputs and targets for (step, micro_step): instance images, then as many
        class images with prior preservation; data order, noise and timesteps from (seed, step)."""
        cfg = self.cfg
        g = step_generator(cfg.seed, step, stream=micro_step * 1024 + self.rank)
        bs = cfg.batch_size
        idx = torch.randint(len(self.instance_bchw), (bs,), generator=g)
        latents = [self._latents(idx, self.instance_bchw, self.inst_dist, g)]
        prior = cfg.with_prior_preservation and self.class_bchw is not None
        if prior:
            cidx = torch.randint(len(self.class_bchw), (bs,), generator=g)
            latents.append(self._latents(cidx, self.class_bchw, self.class_dist, g))
        latents_bchw = torch.cat(latents)
        n = latents_bchw.shape[0]
        noise_bchw = torch.randn(latents_bchw.shape, generator=g).to(self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=g).to(self.device)
        noisy_bchw = self.scheduler.add_noise(latents_bchw, noise_bchw, timesteps)
        if cfg.train_text_encoder:
            ids = torch.cat([self.instance_ids] * bs + ([self.class_ids] * bs if prior else []))
            cond = self.text_encoder(ids)[0]
        else:
            cond = torch.cat([self.inst_emb] * bs + ([self.class_emb] * bs if prior else []))
        if self.scheduler.config.prediction_type == "v_prediction":
            target_bchw = self.scheduler.get_velocity(latents_bchw, noise_bchw, timesteps)
        else:
            target_bchw = noise_bchw
        return DreamBoothBatch(noisy_bchw, timesteps, cond.to(self.device), target_bchw, prior)

    def loss_terms(self, pred_bchw: torch.Tensor, batch: DreamBoothBatch) -> dict[str, torch.Tensor]:
        """``loss = mse(instance) + prior_loss_weight * mse(class)`` of the UNet's prediction."""
        if batch.prior:
            pred_i, pred_c = pred_bchw.float().chunk(2)
            target_i, target_c = batch.target_bchw.float().chunk(2)
            loss_instance = F.mse_loss(pred_i, target_i)
            loss_prior = F.mse_loss(pred_c, target_c)
            loss = loss_instance + self.cfg.prior_loss_weight * loss_prior
            return {"loss": loss, "loss_instance": loss_instance, "loss_prior": loss_prior}
        loss = F.mse_loss(pred_bchw.float(), batch.target_bchw.float())
        return {"loss": loss, "loss_instance": loss}

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.batch(step, micro_step)
        pred_bchw = self.forward_unet(b.noisy_bchw, b.timesteps, b.cond).sample
        terms = self.loss_terms(pred_bchw, b)
        return terms["loss"], {k: v.item() for k, v in terms.items()}


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
    instance_bchw: torch.Tensor
    class_bchw: torch.Tensor | None
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None


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
    if base.family != "sd":
        raise ConfigError(
            f"base model {base.spec!r} is {base.family}; this version trains Stable Diffusion 1.x/2.x models only"
        )
    cfg = cfg.resolve(native_resolution=base.resolution)
    if subject.identifier:
        identifier = check_identifier(base.tokenizer, subject.identifier)
    else:
        identifier = choose_identifier(base.tokenizer, subject.subject_id)
    fill = {"identifier": identifier, "class_noun": class_noun}
    instance_prompt = cfg.instance_prompt.format(**fill)
    class_prompt = cfg.class_prompt.format(**fill)
    check_prompt_length(base.tokenizer, instance_prompt, "instance prompt")
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.mixed_precision, device)

    g = step_generator(cfg.seed, 0, stream=99)
    instance_bchw = torch.stack([
        image_to_tensor(im, cfg.resolution, center_crop=cfg.center_crop, flip=cfg.random_flip, g=g)
        for im in subject.images
    ])
    class_bchw, class_meta = None, None
    if cfg.with_prior_preservation:
        cache = class_cache or ClassImageCache()
        req = ClassImageRequest.for_config(cfg, class_prompt)
        base.unet.to(device)
        got = cache.ensure(base, req, device=device)
        class_bchw = torch.stack([
            image_to_tensor(Image.open(p).convert("RGB"), cfg.resolution, center_crop=True, flip=False, g=g)
            for p in got.paths
        ])
        class_meta = {"cache_key": got.key, "folder": str(got.folder), "count": len(got.paths), "generated": got.generated}
    return PreparedSubject(
        subject=subject, base=base, cfg=cfg, identifier=identifier, instance_prompt=instance_prompt,
        class_prompt=class_prompt, class_images=class_meta, instance_bchw=instance_bchw, class_bchw=class_bchw,
        device=device, weight_dtype=dtype or torch.float32, autocast_dtype=dtype,
    )


def place_module(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move ``module`` to ``device`` and cast it to ``dtype`` (the cast only when it differs)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def setup_frozen(p: PreparedSubject) -> None:
    """Freeze the VAE, and the text encoder unless it is trained; move them to the device in the weight dtype."""
    frozen = [p.base.vae] + ([] if p.cfg.train_text_encoder else [p.base.text_encoder])
    for module in frozen:
        module.requires_grad_(False)
        place_module(module, p.device, p.weight_dtype)


def setup_trainable(p: PreparedSubject) -> None:
    """Freeze what is frozen, add LoRA adapters or unfreeze the UNet, move to the device."""
    cfg, base = p.cfg, p.base
    setup_frozen(p)
    if cfg.method == "lora":
        place_module(base.unet, p.device, p.weight_dtype)
        add_lora(base.unet, cfg.lora_rank, cfg.lora_alpha, UNET_TARGETS, seed=cfg.seed)
    else:
        base.unet.requires_grad_(True)
        place_module(base.unet, p.device, torch.float32)
    if cfg.train_text_encoder:
        if cfg.method == "lora":
            place_module(base.text_encoder, p.device, p.weight_dtype)
            add_lora(base.text_encoder, cfg.lora_rank, cfg.lora_alpha, TEXT_ENCODER_TARGETS, seed=cfg.seed + 1)
        else:
            base.text_encoder.requires_grad_(True)
            place_module(base.text_encoder, p.device, torch.float32)
        base.text_encoder.train()
    # Trainable parameters stay fp32 (master weights) whatever the frozen weights' dtype.
    for module in (base.unet, base.text_encoder):
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            base.text_encoder.gradient_checkpointing_enable()
    base.unet.train()


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
def validation_images(p: PreparedSubject, prompts: list[str] | None = None, *, seed: int | None = None) -> list[Image.Image]:
    """Images of the current (partly trained) model, one row of ``num_validation_images`` per prompt."""
    cfg = p.cfg
    fill = {"identifier": p.identifier, "class_noun": p.subject.class_noun}
    prompts = [t.format(**fill) for t in (prompts or cfg.validation_prompts)]
    pipe = p.base.pipeline()
    was_training = p.base.unet.training
    p.base.unet.eval()
    images = []
    gen_device = p.device if p.device.type == "cuda" else "cpu"
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator(gen_device).manual_seed((seed if seed is not None else cfg.seed) + 1000 * i + j)
                for j in range(cfg.num_validation_images)]
        with torch.autocast(p.device.type, dtype=p.autocast_dtype, enabled=p.autocast_dtype is not None):
            images += pipe([prompt] * cfg.num_validation_images, height=cfg.resolution, width=cfg.resolution,
                           num_inference_steps=cfg.validation_inference_steps, generator=gens).images
    p.base.unet.train(was_training)
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
        write_json(tmp / "loss_history.json", result.history)
        write_json(tmp / EXPERT_FILE, info.to_dict())
    return info


def _write_weights(tmp: Path, p: PreparedSubject, unet_state, unet_lora: LoraWeights | None) -> list[str]:
    """The trained weights into the expert folder being written; returns what it holds."""
    cfg, base = p.cfg, p.base
    if unet_lora is not None:
        write_lora(tmp, unet_lora)
        return ["pytorch_lora_weights.safetensors"]
    if cfg.method == "lora":
        save_lora(tmp, base.unet, base.text_encoder if cfg.train_text_encoder else None, unet_state=unet_state)
        return ["pytorch_lora_weights.safetensors"]
    if unet_state is not None:
        from diffusers import UNet2DConditionModel

        full = UNet2DConditionModel.from_config(base.unet.config)
        full.load_state_dict({k: v.float() for k, v in unet_state.items()})
        full.save_pretrained(tmp / "unet", safe_serialization=True)
        return ["unet"]
    base.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    if not cfg.train_text_encoder:
        return ["unet"]
    base.text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    return ["unet", "text_encoder"]


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
            **(extra_stats or {}),
        },
    )
