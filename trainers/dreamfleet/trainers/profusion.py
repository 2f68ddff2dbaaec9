"""ProFusion training with the one loop: PromptNet pre-training and one-photo customisation.

- **Pre-training** (once per base model, :func:`pretrain_promptnet`): many subjects' photos;
  each sample's target is one photo, its reference another photo of the same subject where the
  subject has one (``reference="other"``) or the photo itself (``"same"``, as FFHQ). The loss is
  the plain denoising loss with S* injected into the prompt ``"a {placeholder} {class_noun}"``
  (padded to the tokenizer's length, as at inference). Only PromptNet trains.
- **Customisation** (per subject, :func:`customize_subject`): one photo and augmented views of
  it (random affine: scale, rotation, shift; borders filled by edge replication); reference and
  target views drawn independently; all of PromptNet and a LoRA on the UNet's attention
  ``to_q``/``to_k``/``to_v`` train. No class images, no regulariser (``s_star_l2`` is the
  paper's ablation, 0 by default). The result is a registry expert of method ``profusion``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image

from dreamfleet.core.apprentice import pixels
from dreamfleet.core.artifacts import atomic_dir, write_json
from dreamfleet.core.config import cfg, to_dict
from dreamfleet.core.devices import resolve_device
from dreamfleet.core.errors import ConfigError, DataError, DreamfleetError
from dreamfleet.core.identifiers import check_identifier, choose_identifier
from dreamfleet.core.models import BaseModel, load_base
from dreamfleet.core.profusion import (
    PROMPTNET_FILE,
    PROMPTNET_WEIGHTS,
    Injector,
    PromptNet,
    PromptNetArch,
    PromptNetInfo,
    load_image_encoder,
    load_promptnet,
)
from dreamfleet.core.version import code_version
from dreamfleet.trainers.config import LoopConfig, OptimizerConfig, Scheduler
from dreamfleet.trainers.dreambooth import resolve_precision
from dreamfleet.trainers.loop import LoopHooks, LoopResult, LoopSettings, run_loop, step_generator

QKV_TARGETS = ["to_q", "to_k", "to_v"]


@dataclass(frozen=True)
class ProFusionCommon:
    """What pre-training and customisation share."""

    batch_size: int = cfg(8, "samples per step")
    prompt: str = cfg("a {placeholder} {class_noun}", "training prompt ({placeholder} is S*)")
    s_star_l2: float = cfg(0.0, "L2 penalty on S* (the paper's ablation; ProFusion itself uses none)")
    resolution: int | None = cfg(None, "training side in pixels (default: the base model's)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = cfg("auto", "as for DreamBooth")
    seed: int = cfg(0, "seed of views, sampling, noise and timesteps")
    device: str = cfg("auto", "auto, cpu, cuda, ...")

    def check_common(self) -> None:
        if self.batch_size < 1 or self.s_star_l2 < 0:
            raise ConfigError("config fields 'batch_size' must be >= 1 and 's_star_l2' >= 0")
        if "{placeholder}" not in self.prompt:
            raise ConfigError(f"config field 'prompt' must contain {{placeholder}}, got {self.prompt!r}")


@dataclass(frozen=True)
class PromptNetConfig(LoopConfig, OptimizerConfig, ProFusionCommon):
    """PromptNet pre-training (recorded in promptnet.json); the official recipe's optimizer."""

    steps: int = cfg(2000, "optimizer steps (the paper: 80,000 on FFHQ)")
    learning_rate: float = cfg(2e-5, "AdamW learning rate (the paper's)")
    lr_scheduler: Scheduler = cfg("constant", "learning-rate schedule")
    checkpoint_every: int = cfg(500, "checkpoint every N steps (0: only at the end)")
    validation_every: int = cfg(0, "unused: pre-training writes no validation images")
    image_encoder: str = cfg("vae", "'vae' (the base's own VAE encoder) or a CLIPVisionModel folder / hub id")
    feature_channels: int = cfg(128, "channels of each PromptNet feature map before concatenation")
    k: int | None = cfg(None, "PromptNet's output kernel; None: H_latent/8, one S* token")
    reference: Literal["other", "same"] = cfg("other", "reference: another photo of the subject, or the target")
    placeholder: str | None = cfg(None, "the token S* replaces (default: chosen from rare tokens)")

    def __post_init__(self) -> None:
        self.check_optimizer()
        self.check_loop()
        self.check_common()

    def arch(self) -> PromptNetArch:
        return PromptNetArch(image_encoder=self.image_encoder, feature_channels=self.feature_channels, k=self.k)


@dataclass(frozen=True)
class CustomizeConfig(LoopConfig, OptimizerConfig, ProFusionCommon):
    """One-photo customisation (recorded in the expert): the per-subject notebook's recipe."""

    steps: int = cfg(100, "optimizer steps (the notebook's 100)")
    learning_rate: float = cfg(2e-5, "AdamW learning rate (the notebook's)")
    promptnet_learning_rate: float | None = cfg(None, "PromptNet's own learning rate (None: learning_rate, as the notebook)")
    lr_scheduler: Scheduler = cfg("constant", "learning-rate schedule")
    max_grad_norm: float = cfg(0.0, "gradient clipping norm (0: none, as the notebook)")
    batch_size: int = cfg(4, "views per step")
    checkpoint_every: int = cfg(50, "checkpoint every N steps (0: only at the end)")
    validation_every: int = cfg(0, "unused")
    views: int = cfg(31, "augmented views of the one photo (besides the photo itself)")
    max_scale: float = cfg(0.15, "views: largest zoom in or out")
    max_rotate: float = cfg(10.0, "views: largest rotation in degrees")
    max_shift: float = cfg(0.1, "views: largest shift as a fraction of the side")
    qkv_rank: int = cfg(32, "rank of the LoRA on the UNet's to_q/to_k/to_v")
    promptnet: str = cfg("", "the pre-trained PromptNet folder (`dreamfleet profusion pretrain`)")

    method = "profusion"  # what packing and the fan-out ask of a subject's config (not a field)
    train_text_encoder = False

    @classmethod
    def from_train(cls, t) -> CustomizeConfig:
        """The customisation a resolved ``TrainConfig`` with ``method="profusion"`` asks for."""
        shared = ("steps", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                  "adam_weight_decay", "adam_epsilon", "max_grad_norm", "optimizer", "gradient_accumulation_steps",
                  "checkpoint_every", "checkpoints_total_limit", "batch_size", "resolution", "mixed_precision",
                  "seed", "device", "views", "qkv_rank", "promptnet_learning_rate")
        prompt = (t.instance_prompt or "a {identifier} {class_noun}").replace("{identifier}", "{placeholder}")
        return cls(**{f: getattr(t, f) for f in shared}, promptnet=t.promptnet or "", prompt=prompt)

    def __post_init__(self) -> None:
        self.check_optimizer()
        self.check_loop()
        self.check_common()
        if self.views < 0 or self.qkv_rank < 1:
            raise ConfigError("config fields 'views' must be >= 0 and 'qkv_rank' >= 1")
        if self.promptnet_learning_rate is not None and not self.promptnet_learning_rate > 0:
            raise ConfigError(f"config field 'promptnet_learning_rate' must be > 0 or unset, got "
                              f"{self.promptnet_learning_rate}")


@dataclass
class Photo:
    """One training image of a subject."""

    subject: int
    image: Image.Image


@dataclass
class Prepared:
    """Frozen base, PromptNet, and every image's latent and reference inputs, cached."""

    base: BaseModel
    promptnet: PromptNet
    injector: Injector
    placeholder: str
    cfg: PromptNetConfig | CustomizeConfig
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    mean: torch.Tensor  # [n, C, h, w] latent distribution of each image
    std: torch.Tensor
    image_tokens: torch.Tensor  # [n, T, D_image]
    ids: torch.Tensor  # [n, L] the prompt of each image's subject
    refs: list[list[int]]  # the reference candidates of each target image
    subject: Any = None  # customisation: the SubjectData, and the pre-trained PromptNet's info
    pinfo: PromptNetInfo | None = None


def _freeze(base: BaseModel, device: torch.device, wdtype: torch.dtype) -> None:
    if base.kind.support.profusion != "yes":
        raise ConfigError(f"base model {base.spec!r} is {base.kind.title}; ProFusion does not support it "
                          f"({base.kind.support.profusion})")
    for m in base.modules().values():
        m.requires_grad_(False).to(device)
        if wdtype != torch.float32:
            m.to(dtype=wdtype)


@torch.no_grad()
def _encode_images(base: BaseModel, encoder, photos: list[Photo], res: int, device, wdtype):
    """(latent mean, latent std, image tokens) of every photo, on the CPU."""
    sf = float(base.vae.config.scaling_factor)
    means, stds, tokens = [], [], []
    for i in range(0, len(photos), 16):
        x = torch.stack([pixels(p.image, res) for p in photos[i:i + 16]]).to(device, wdtype)
        d = base.vae.encode(x).latent_dist
        means.append((d.mean * sf).float().cpu())
        stds.append((d.std * sf).float().cpu())
        tokens.append(encoder(x).float().cpu())
    return torch.cat(means), torch.cat(stds), torch.cat(tokens)


def _prompt_ids(base: BaseModel, c, placeholder: str, class_nouns: list[str], photos: list[Photo]) -> torch.Tensor:
    tok = base.tokenizer
    texts = [" ".join(c.prompt.format(placeholder=placeholder, class_noun=class_nouns[p.subject]).split())
             for p in photos]
    return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def _references(photos: list[Photo], mode: str) -> list[list[int]]:
    """Each target's reference candidates: the subject's other photos ("other"), itself ("same"),
    or every view ("any": customisation draws reference and target independently)."""
    by_subject: dict[int, list[int]] = {}
    for i, p in enumerate(photos):
        by_subject.setdefault(p.subject, []).append(i)
    if mode == "any":
        return [by_subject[p.subject] for p in photos]
    if mode == "same":
        return [[i] for i in range(len(photos))]
    return [[j for j in by_subject[p.subject] if j != i] or [i] for i, p in enumerate(photos)]


def prepare(base: BaseModel, c, promptnet: PromptNet | None, placeholder: str, photos: list[Photo],
            class_nouns: list[str], refs: str) -> Prepared:
    """Freeze the base, cache every photo's latent and reference inputs; ``promptnet`` None: a new one."""
    device = resolve_device(c.device)
    dtype = resolve_precision(c.mixed_precision, device)
    wdtype = dtype or torch.float32
    _freeze(base, device, wdtype)
    arch = c.arch() if promptnet is None else promptnet.arch
    encoder = load_image_encoder(arch.image_encoder, base).to(device)
    res = c.resolution or base.resolution
    mean, std, tokens = _encode_images(base, encoder, photos, res, device, wdtype)
    if promptnet is None:  # the new layers' init is a function of the seed alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            promptnet = PromptNet.from_unet(base.unet, int(base.text_encoder.config.hidden_size), tokens.shape[-1],
                                            arch)
    promptnet = promptnet.to(device, torch.float32).train().requires_grad_(True)
    ids = _prompt_ids(base, c, placeholder, class_nouns, photos)
    n = promptnet.num_tokens(mean.shape[-1])
    if n != 1:  # the training prompt names S* once per token
        ids = _prompt_ids(base, dataclasses.replace(c, prompt=c.prompt.replace(
            "{placeholder}", " ".join(["{placeholder}"] * n))), placeholder, class_nouns, photos)
    return Prepared(base, promptnet, Injector(base.text_encoder), placeholder, c, device, wdtype, dtype,
                    mean, std, tokens, ids, _references(photos, refs))


class ProFusionObjective:
    """Denoising loss with S* from PromptNet injected into the prompt (the loop's Objective)."""

    def __init__(self, p: Prepared, rank: int = 0, *, train_qkv: bool = False):
        self.p, self.cfg, self.rank, self.train_qkv = p, p.cfg, rank, train_qkv
        self.placeholder_id = int(p.base.tokenizer.convert_tokens_to_ids(
            p.base.tokenizer.tokenize(p.placeholder)[0]))
        # The distributed engine (parallelize.build_engine) wraps ``denoiser`` in DDP or DeepSpeed
        # and the loss calls through ``forward_unet``: here the module trained is PromptNet.
        self.denoiser = self.forward_unet = p.promptnet
        rate = getattr(self.cfg, "promptnet_learning_rate", None)
        self.learning_rates = {"promptnet": rate} if train_qkv and rate is not None else {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {"promptnet": self.p.promptnet}
        if self.train_qkv:
            mods["unet"] = self.p.base.unet
        return mods

    def batch(self, step: int, micro_step: int):
        """(target latents, reference indices, noise, timesteps) of one step, from (seed, step)."""
        p, g = self.p, step_generator(self.cfg.seed, step, stream=micro_step * 1024 + self.rank)
        idx = torch.randint(len(p.mean), (self.cfg.batch_size,), generator=g)
        ref = torch.tensor([p.refs[i][int(torch.randint(len(p.refs[i]), (1,), generator=g))] for i in idx.tolist()])
        latents = p.mean[idx] + p.std[idx] * torch.randn(p.mean[idx].shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, p.base.noise_scheduler.config.num_train_timesteps, (len(idx),), generator=g)
        return idx, ref, latents, noise, t

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        p, dev, wd = self.p, self.p.device, self.p.weight_dtype
        idx, ref, latents, noise, t = self.batch(step, micro_step)
        sched = p.base.noise_scheduler
        noisy = sched.add_noise(latents, noise, t).to(dev)
        t = t.to(dev)
        s_star = self.forward_unet(p.mean[ref].to(dev), t, p.image_tokens[ref].to(dev), noisy)
        ids = p.ids[idx].to(dev)
        with p.injector.inject(ids == self.placeholder_id, s_star):
            text = p.base.text_encoder(ids)[0]
        pred = p.base.unet(noisy.to(wd), t, text.to(wd)).sample
        target = sched.get_velocity(latents, noise, t.cpu()) if sched.config.prediction_type == "v_prediction" else noise
        mse = F.mse_loss(pred.float(), target.to(dev).float())
        loss = mse + self.cfg.s_star_l2 * s_star.float().pow(2).mean() if self.cfg.s_star_l2 else mse
        return loss, {"loss": loss.item(), "mse": mse.item(), "s_star_norm": s_star.detach().float().norm(dim=-1).mean().item()}


class Stopped(DreamfleetError):
    """The loop was stopped (``should_stop``) before its last step: nothing is published, the
    checkpoints stay in the work folder and the same call resumes from them."""


def _finished(result: LoopResult, c, work: Path) -> None:
    if result.final_step < c.steps:
        raise Stopped(f"stopped at step {result.final_step} of {c.steps}; checkpoints kept in {work}, "
                      "run the same command again to resume")


def loop_settings(p: Prepared, description: str, *, progress: bool) -> LoopSettings:
    return LoopSettings(p.cfg, p.cfg, autocast_dtype=p.autocast_dtype, device=p.device, progress=progress,
                        description=description)


# --------------------------------------------------------------------------- pre-training


def manifest_photos(manifest: str | Path, subjects: list[str] | None = None):
    """(photos, class nouns, dataset record) of a manifest's subjects; an unreadable subject is
    skipped and named in the record (one bad subject never stops the others)."""
    import logging

    from dreamfleet.data.manifest import Manifest

    m = Manifest.open(manifest)
    photos, nouns, skipped, records = [], [], {}, []
    for sid in subjects or m.subject_ids():
        try:
            rec = m.record(sid)
            images = [im for _, im, _ in m.read_images(rec)]
        except (DataError, KeyError, OSError) as e:
            logging.getLogger("dreamfleet").warning("PromptNet pre-training skips subject %s: %s", sid, e)
            skipped[sid] = str(e)
            continue
        photos += [Photo(len(nouns), im) for im in images]
        nouns.append(rec.class_noun)
        records.append(f"{sid}:{rec.content_hash}")
    if not photos:
        raise DataError(f"{manifest}: no readable subject to pre-train PromptNet on (skipped: {skipped})")
    from dreamfleet.core.hashing import sha256_json

    dataset = {"uri": str(manifest), "subjects": len(nouns), "images": len(photos), "skipped": skipped,
               "content_hash": sha256_json(sorted(records))}
    return photos, nouns, dataset


def publish_promptnet(p: Prepared, result: LoopResult, out: Path, *, dataset: dict, wall_time_s: float,
                      overwrite: bool, extra_stats: dict | None = None,
                      full_state: dict[str, torch.Tensor] | None = None) -> PromptNetInfo:
    """Write the PromptNet folder atomically (weights, promptnet.json, loss history);
    ``full_state``: the consolidated weights when ZeRO-3 left this process a shard."""
    from safetensors.torch import save_file

    net = p.promptnet
    state = full_state if full_state is not None else net.state_dict()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp / PROMPTNET_WEIGHTS))
        info = PromptNetInfo(
            base_model=p.base.describe, arch=dataclasses.asdict(net.arch), placeholder_token=p.placeholder,
            text_dim=int(net.out.out_channels), image_dim=int(net.image_proj.in_features), config=to_dict(p.cfg),
            code_version=code_version(), input_hash=str(dataset.get("content_hash", "")), dataset=dataset,
            final_loss=result.final_loss, wall_time_s=round(wall_time_s, 3),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            train_stats={"steps": result.final_step, "resumed_from": result.resumed_from,
                         "step_time_s": round(result.step_time_s, 3), "device": str(p.device),
                         "parameters": sum(x.numel() for x in net.parameters()), **(extra_stats or {})})
        write_json(tmp / "loss_history.json", result.history)
        write_json(tmp / PROMPTNET_FILE, info.to_dict())
    return info


def choose_placeholder(base: BaseModel, c: PromptNetConfig) -> str:
    """The token S* replaces: the config's (checked to be one token), or a rare one."""
    return check_identifier(base.tokenizer, c.placeholder) if c.placeholder else choose_identifier(base.tokenizer,
                                                                                                   "profusion")


def pretrain_promptnet(manifest: str | Path, base: BaseModel | str, c: PromptNetConfig, out: str | Path, *,
                       subjects: list[str] | None = None, overwrite: bool = False, progress: bool = True,
                       hooks: LoopHooks | None = None) -> PromptNetInfo:
    """Pre-train PromptNet in this process (no Ray); resumable from the work folder beside ``out``."""
    import shutil

    t0, out = time.perf_counter(), Path(out)
    if (out / PROMPTNET_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out} already holds a PromptNet; pass --overwrite or choose another --out")
    base = load_base(base) if isinstance(base, str) else base
    photos, nouns, dataset = manifest_photos(manifest, subjects)
    placeholder = choose_placeholder(base, c)
    p = prepare(base, c, None, placeholder, photos, nouns, c.reference)
    work = out.parent / f".{out.name}.work"
    result = run_loop(ProFusionObjective(p), loop_settings(p, "promptnet", progress=progress),
                      checkpoint_dir=work / "checkpoints", hooks=hooks, config=to_dict(c))
    _finished(result, c, work)
    info = publish_promptnet(p, result, out, dataset=dataset, wall_time_s=time.perf_counter() - t0,
                             overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return info


# --------------------------------------------------------------------------- customisation


def augmented_views(photo: Image.Image, c: CustomizeConfig) -> list[Image.Image]:
    """``c.views`` random affine views of the photo (zoom, rotation, shift), borders replicated
    from the edge; a function of ``c.seed`` alone."""
    import random

    import numpy as np

    rng = random.Random(c.seed)
    img = photo.convert("RGB")
    w, h = img.size
    pad = int(0.35 * max(w, h))
    big = Image.fromarray(np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="edge"))
    views = []
    for _ in range(c.views):
        scale = 1.0 + rng.uniform(-c.max_scale, c.max_scale)
        turned = big.rotate(rng.uniform(-c.max_rotate, c.max_rotate), resample=Image.BICUBIC,
                            translate=(rng.uniform(-c.max_shift, c.max_shift) * w,
                                       rng.uniform(-c.max_shift, c.max_shift) * h))
        cx, cy, sw, sh = big.width / 2, big.height / 2, w / scale, h / scale
        box = (round(cx - sw / 2), round(cy - sh / 2), round(cx + sw / 2), round(cy + sh / 2))
        views.append(turned.crop(box).resize((w, h), Image.BICUBIC))
    return views


def _add_qkv_lora(p: Prepared) -> None:
    from dreamfleet.trainers.lora import add_lora

    c = p.cfg
    add_lora(p.base.unet, c.qkv_rank, c.qkv_rank, QKV_TARGETS, seed=c.seed)
    for param in p.base.unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def prepare_customization(subject, base: BaseModel | str, c: CustomizeConfig) -> tuple[Prepared, PromptNetInfo]:
    """The one photo and its views, the pre-trained PromptNet, a q/k/v LoRA on the UNet."""
    if not c.promptnet:
        raise ConfigError("ProFusion needs a pre-trained PromptNet: pass --promptnet FOLDER "
                          "(make one with `dreamfleet profusion pretrain`)")
    base = load_base(base) if isinstance(base, str) else base
    net, pinfo = load_promptnet(c.promptnet, base)
    if not subject.images:
        raise DataError(f"subject {subject.subject_id}: no photo to customise from")
    photo = subject.images[0]
    photos = [Photo(0, im) for im in [photo, *augmented_views(photo, c)]]
    p = prepare(base, c, net, pinfo.placeholder_token, photos, [subject.class_noun], "any")
    _add_qkv_lora(p)
    return p, pinfo


def prepare_from_train(subject, base: BaseModel, cfg) -> Prepared:
    """A subject whose ``TrainConfig`` says ``method="profusion"``, prepared for ``fit``."""
    c = CustomizeConfig.from_train(cfg.resolve(native_resolution=base.resolution))
    p, pinfo = prepare_customization(subject, base, c)
    p.subject, p.pinfo = subject, pinfo
    return p


def objective_for_fit(p: Prepared, dist, zero_stage: int, offload: bool) -> ProFusionObjective:
    """The customisation's objective in ``fit``: one process (100 steps of one photo need no more)."""
    if dist.world_size > 1 or zero_stage or offload:
        raise ConfigError(f"subject {p.subject.subject_id!r}: method=profusion trains on one worker; use "
                          "--workers-per-subject 1 and no --zero-stage or --offload for ProFusion subjects")
    return ProFusionObjective(p, train_qkv=True)


def customize_subject(subject, base: BaseModel | str, c: CustomizeConfig, out_dir: str | Path, *,
                      overwrite: bool = False, progress: bool = True, hooks: LoopHooks | None = None,
                      checkpoint_dir: Path | None = None):
    """Customise from the subject's first photo, publish a ``profusion`` expert at ``out_dir``;
    returns (its ExpertInfo, the loop's result)."""
    import shutil

    from dreamfleet.core.expert import EXPERT_FILE

    t0, out_dir = time.perf_counter(), Path(out_dir)
    if (out_dir / EXPERT_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out_dir} already holds an expert; pass --overwrite to replace it, or choose another --out")
    p, pinfo = prepare_customization(subject, base, c)
    work = out_dir.parent / f".{out_dir.name}.work"
    result = run_loop(ProFusionObjective(p, train_qkv=True), loop_settings(p, "profusion", progress=progress),
                      checkpoint_dir=checkpoint_dir or work / "checkpoints", hooks=hooks, config=to_dict(c))
    _finished(result, c, work)
    info = publish_profusion_expert(p, pinfo, subject, result, out_dir, wall_time_s=time.perf_counter() - t0,
                                    overwrite=overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return info, result


def publish_profusion_expert(p: Prepared, pinfo: PromptNetInfo, subject, result: LoopResult, out: Path, *,
                             wall_time_s: float, overwrite: bool, extra_stats: dict | None = None):
    """The expert folder: the q/k/v LoRA (diffusers format), the customised PromptNet, the photo."""
    from dreamfleet.core.expert import EXPERT_FILE, LORA_WEIGHTS, ExpertInfo
    from dreamfleet.trainers.lora import lora_weights, write_lora

    with atomic_dir(out, overwrite=overwrite) as tmp:
        lora = write_lora(tmp, {"unet": lora_weights(p.base.unet)}, p.base.kind)
        publish_promptnet(p, result, tmp / "promptnet", dataset=pinfo.dataset, wall_time_s=wall_time_s,
                          overwrite=True, extra_stats={"pretrained": {"input_hash": pinfo.input_hash,
                                                                      "steps": pinfo.train_stats.get("steps")}})
        (tmp / "instance").mkdir()
        subject.images[0].convert("RGB").save(tmp / "instance" / "00.png")
        prompt = " ".join(p.cfg.prompt.format(placeholder=p.placeholder, class_noun=subject.class_noun).split())
        sizes = {"qkv_lora_bytes": lora.stat().st_size,
                 "promptnet_bytes": (tmp / "promptnet" / PROMPTNET_WEIGHTS).stat().st_size}
        info = ExpertInfo(
            subject_id=subject.subject_id, class_noun=subject.class_noun, identifier=p.placeholder,
            instance_prompt=prompt, method="profusion", base_model=p.base.describe, config=to_dict(p.cfg),
            code_version=code_version(), input_hash=subject.input_hash(), num_images=1,
            final_loss=result.final_loss, wall_time_s=round(wall_time_s, 3),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            weights=[LORA_WEIGHTS, "promptnet"], tenant=getattr(subject, "tenant", None),
            source=getattr(subject, "source", None),
            train_stats={"steps": result.final_step, "resumed_from": result.resumed_from,
                         "step_time_s": round(result.step_time_s, 3), "views": p.cfg.views + 1,
                         "device": str(p.device), **sizes, **(extra_stats or {})})
        write_json(tmp / "loss_history.json", result.history)
        write_json(tmp / EXPERT_FILE, info.to_dict())
    return info
