"""Training the apprentice on a demonstration set, with the project's one training loop.

Each sample is a (demonstrations, prompt, target) triple from ``dreamfleet apprentice
gather``: the target (an expert's kept render) is noised, and the UNet predicts the noise
from the prompt (``[V]`` replaced by the apprentice's identifier) *and* K of the subject's
real photos, K drawn per step from ``[min_demos, max_demos]``. Only the added modules train
(the demonstration encoder and the demonstration key/value projections), unless
``train_unet`` is set. Text and demonstrations are dropped (empty prompt, zero latents) for a
fraction of the samples, so that classifier-free guidance works on both.

With ``photo_targets`` > 0, that fraction of the samples instead takes one of the subject's
own photos as the target (its caption as the prompt) and the subject's *other* photos as the
demonstrations: clean, leave-one-out reconstruction targets beside the experts' renders (as
encoder methods such as ELITE and BLIP-Diffusion train; SuTI itself uses renders only, the
default ``0``).

:class:`ApprenticeObjective` plugs into :func:`dreamfleet.trainers.loop.run_loop`; the Ray
Train runtime (:func:`dreamfleet.trainers.runtime.apprentice_worker`) wraps the same objective
in DDP or DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from dreamfleet.core.apprentice import (
    APPRENTICE_FILE,
    APPRENTICE_WEIGHTS,
    ApprenticeArch,
    ApprenticeInfo,
    apprentice_state,
    attach,
    encode_demos,
    pixels,
)
from dreamfleet.core.artifacts import atomic_dir, write_json
from dreamfleet.core.config import cfg, to_dict
from dreamfleet.core.devices import resolve_device
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.identifiers import check_identifier, choose_identifier
from dreamfleet.core.models import BaseModel, load_base
from dreamfleet.core.version import code_version
from dreamfleet.trainers.config import LoopConfig, OptimizerConfig, Scheduler
from dreamfleet.trainers.dreambooth import resolve_precision
from dreamfleet.trainers.loop import LoopHooks, LoopResult, LoopSettings, run_loop, step_generator

log = logging.getLogger("dreamfleet")


@dataclass(frozen=True)
class ApprenticeConfig(LoopConfig, OptimizerConfig):
    """How the apprentice is trained (recorded in apprentice.json). The same optimizer and loop
    sections as DreamBooth's config, with the apprentice's defaults where they differ."""

    steps: int = cfg(2000, "optimizer steps")
    learning_rate: float = cfg(1e-4, "AdamW learning rate (IP-Adapter: 1e-4)")
    lr_scheduler: Scheduler = cfg("cosine", "learning-rate schedule")
    lr_warmup_steps: int = cfg(100, "linear warm-up steps")
    checkpoint_every: int = cfg(500, "checkpoint every N steps (0: only at the end)")
    validation_every: int = cfg(0, "unused: the apprentice writes no validation images while training")
    batch_size: int = cfg(16, "triples per step")
    min_demos: int = cfg(3, "fewest demonstrations per sample")
    max_demos: int = cfg(5, "most demonstrations per sample")
    drop_text: float = cfg(0.05, "fraction of samples trained with an empty prompt")
    drop_demos: float = cfg(0.05, "fraction trained without demonstrations (zero latents)")
    drop_both: float = cfg(0.05, "fraction trained with neither (unconditional)")
    photo_targets: float = cfg(0.0, "fraction of samples whose target is one of the subject's own photos, the others "
                                    "its demonstrations (0: expert renders only, as SuTI)")
    grid: int = cfg(4, "tokens per demonstration = grid x grid")
    encoder_width: int = cfg(64, "channels of the demonstration encoder")
    train_unet: bool = cfg(False, "also fine-tune the whole UNet (SuTI fine-tunes the apprentice fully)")
    identifier: str | None = cfg(None, "the token that stands for the demonstrated subject (default: chosen from rare tokens)")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = cfg("auto", "as for DreamBooth")
    seed: int = cfg(0, "seed of sampling, noise, timesteps and drops")
    device: str = cfg("auto", "auto, cpu, cuda, ...")

    def __post_init__(self) -> None:
        self.check_optimizer()
        self.check_loop()
        if self.batch_size < 1:
            raise ConfigError(f"config field 'batch_size' must be at least 1, got {self.batch_size}")
        if not 1 <= self.min_demos <= self.max_demos <= 8:
            raise ConfigError(f"need 1 <= min_demos ({self.min_demos}) <= max_demos ({self.max_demos}) <= 8")
        for name in ("drop_text", "drop_demos", "drop_both"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")
        if not 0.0 <= self.photo_targets <= 1.0:
            raise ConfigError(f"photo_targets must be in [0, 1], got {self.photo_targets}")
        if self.drop_text + self.drop_demos + self.drop_both >= 1.0:
            raise ConfigError("drop_text + drop_demos + drop_both must be below 1")

    def arch(self) -> ApprenticeArch:
        return ApprenticeArch(grid=self.grid, width=self.encoder_width)


@dataclass
class PreparedApprentice:
    base: BaseModel
    cfg: ApprenticeConfig
    identifier: str
    device: torch.device
    weight_dtype: torch.dtype
    autocast_dtype: torch.dtype | None
    demo_latents: list[torch.Tensor]  # per subject: [n_demos, F]
    target_mean: torch.Tensor  # [T, C, h, w] (scaled latent distribution of each target)
    target_std: torch.Tensor
    target_subject: torch.Tensor  # [T] subject index of each target
    target_emb: torch.Tensor  # [T, L, D] text embedding of each target's prompt
    empty_emb: torch.Tensor  # [1, L, D]
    photo_mean: list[torch.Tensor]  # per subject: [n_demos, C, h, w] (photos as targets; empty unless photo_targets)
    photo_std: list[torch.Tensor]
    photo_emb: list[torch.Tensor]  # per subject: [n_demos, L, D] text embedding of each photo's caption
    dataset: dict
    input_hash: str


def _attach_trainable(base: BaseModel, c: ApprenticeConfig, device: torch.device, wdtype: torch.dtype) -> None:
    """Freeze the base model, attach the apprentice modules; trainable weights stay fp32 (master weights)."""
    base.vae.requires_grad_(False).to(device, wdtype)
    base.text_encoder.requires_grad_(False).to(device, wdtype)
    base.unet.requires_grad_(c.train_unet).to(device, torch.float32 if c.train_unet else wdtype)
    attach(base.unet, c.arch(), latent_channels=int(base.unet.config.in_channels),
           latent_size=int(base.unet.config.sample_size))
    for name, p in base.unet.named_parameters():
        if "encoder_hid_proj" in name or ".processor." in name:
            p.requires_grad_(True)
            p.data = p.data.float()


def _embed(base: BaseModel, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Each prompt's text embedding (on the CPU), 64 prompts per text-encoder pass."""
    tok, out = base.tokenizer, {}
    for i in range(0, len(prompts), 64):
        batch = prompts[i:i + 64]
        ids = tok(batch, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        for p, e in zip(batch, base.text_encoder(ids)[0].float().cpu(), strict=True):
            out[p] = e
    return out


def check_apprentice_base(base: BaseModel) -> None:
    """The apprentice attaches to an SD 1.x/2.x UNet; other families are refused, saying so."""
    if base.kind.support.apprentice != "yes":
        raise ConfigError(f"base model {base.spec!r} is {base.kind.title}; the apprentice does not support it "
                          f"({base.kind.support.apprentice})")


def prepare_apprentice(demo_set: str | Path, base: BaseModel | str, c: ApprenticeConfig) -> PreparedApprentice:
    """Read the demonstration set, attach the apprentice modules, cache every latent and embedding."""
    from dreamfleet.data.demos import read_demo_set

    subjects, info = read_demo_set(demo_set)
    base = load_base(base) if isinstance(base, str) else base
    check_apprentice_base(base)
    identifier = check_identifier(base.tokenizer, c.identifier) if c.identifier else choose_identifier(base.tokenizer, "apprentice")
    device = resolve_device(c.device)
    dtype = resolve_precision(c.mixed_precision, device)
    wdtype = dtype or torch.float32
    _attach_trainable(base, c, device, wdtype)
    res = base.resolution
    sf = float(base.vae.config.scaling_factor)
    demo_latents, means, stds, owners, prompts = [], [], [], [], []
    photo_mean, photo_std, photo_prompts = [], [], []
    with torch.no_grad():
        for si, s in enumerate(subjects):
            if c.photo_targets > 0:  # the photos are targets too: one encoding gives both mean and std
                d = base.vae.encode(torch.stack([pixels(im, res) for im in s.demos]).to(device, wdtype)).latent_dist
                photo_mean.append((d.mean * sf).float().cpu())  # as encode_demos computes it
                photo_std.append((d.std * sf).float().cpu())
                demo_latents.append(photo_mean[-1].flatten(1))
                texts = [*s.demo_texts, *[""] * (len(s.demos) - len(s.demo_texts))]
                photo_prompts.append([" ".join((t or "a {0} {1}").replace("{0}", identifier)
                                               .replace("{1}", s.class_noun).split()) for t in texts])
            else:
                demo_latents.append(encode_demos(base.vae, s.demos, res))
            for i in range(0, len(s.targets), 16):
                chunk = s.targets[i:i + 16]
                x = torch.stack([pixels(t.image, res) for t in chunk]).to(device, wdtype)
                d = base.vae.encode(x).latent_dist
                means.append((d.mean.float() * sf).cpu())
                stds.append((d.std.float() * sf).cpu())
                owners += [si] * len(chunk)
                prompts += [" ".join(t.template.format(identifier, s.class_noun).split()) for t in chunk]
        unique = [*sorted(set(prompts) | {q for qs in photo_prompts for q in qs}), ""]
        emb_of = _embed(base, unique, device)
    n_targets = len(owners)
    log.info("apprentice data: %d subjects, %d targets, %d unique prompts", len(subjects), n_targets, len(unique) - 1)
    return PreparedApprentice(
        base=base, cfg=c, identifier=identifier, device=device, weight_dtype=wdtype, autocast_dtype=dtype,
        demo_latents=demo_latents, target_mean=torch.cat(means), target_std=torch.cat(stds),
        target_subject=torch.tensor(owners), target_emb=torch.stack([emb_of[p] for p in prompts]),
        empty_emb=emb_of[""].unsqueeze(0),
        photo_mean=photo_mean, photo_std=photo_std,
        photo_emb=[torch.stack([emb_of[q] for q in qs]) for qs in photo_prompts],
        dataset={"uri": str(demo_set), "subjects": len(subjects), "targets": n_targets,
                 "content_hash": info.get("content_hash"), "builder": info.get("builder", {}).get("kind")},
        input_hash=str(info.get("content_hash") or ""),
    )


class ApprenticeObjective:
    """Batch of triples -> epsilon-prediction MSE, conditioned on text and demonstrations."""

    def __init__(self, p: PreparedApprentice, rank: int = 0):
        self.p, self.cfg, self.rank = p, p.cfg, rank
        self.denoiser = p.base.unet
        self.forward_unet = p.base.unet  # a distributed runtime swaps in its DDP wrapper
        self.scheduler = p.base.noise_scheduler
        self.modules = torch.nn.ModuleDict({
            "image_proj": self.denoiser.encoder_hid_proj,
            "ip_layers": torch.nn.ModuleList(
                [m for n, m in self.denoiser.named_modules() if n.endswith("attn2.processor")]),
        })

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        if self.cfg.train_unet:
            return {"unet": self.denoiser}
        return dict(self.modules.items())

    def batch(self, step: int, micro_step: int):
        """(noisy latents, timesteps, text embeddings, demo latents, noise) of one step, from (seed, step)."""
        c, p = self.cfg, self.p
        g = step_generator(c.seed, step, stream=micro_step * 1024 + self.rank)
        b = c.batch_size
        idx = torch.randint(len(p.target_subject), (b,), generator=g)
        k = int(torch.randint(c.min_demos, c.max_demos + 1, (1,), generator=g))
        demos = []
        for s in p.target_subject[idx].tolist():
            pool = p.demo_latents[s]
            pick = torch.randperm(len(pool), generator=g)[:k] if len(pool) >= k else torch.randint(len(pool), (k,), generator=g)
            demos.append(pool[pick])
        demos_bkf = torch.stack(demos)
        text_bld = p.target_emb[idx].clone()
        u = torch.rand(b, generator=g)
        no_text = (u < c.drop_text) | (u >= 1.0 - c.drop_both)
        no_demo = ((u >= c.drop_text) & (u < c.drop_text + c.drop_demos)) | (u >= 1.0 - c.drop_both)
        text_bld[no_text] = p.empty_emb
        demos_bkf[no_demo] = 0.0
        eps = torch.randn(p.target_mean[idx].shape, generator=g)
        latents = p.target_mean[idx] + p.target_std[idx] * eps
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g)
        if c.photo_targets > 0:  # drawn after everything else: photo_targets=0 keeps the streams of before
            self._photo_targets(g, k, latents, eps, text_bld, demos_bkf, no_text, no_demo)
        noisy = self.scheduler.add_noise(latents, noise, t)
        return latents, noisy, t, text_bld, demos_bkf, noise

    def _photo_targets(self, g, k, latents, eps, text_bld, demos_bkf, no_text, no_demo) -> None:
        """Replace some samples' targets by one of a subject's photos, conditioned on its other photos (in place)."""
        p = self.p
        use = torch.rand(len(latents), generator=g) < self.cfg.photo_targets
        for i in use.nonzero().flatten().tolist():
            s = int(torch.randint(len(p.photo_mean), (1,), generator=g))
            n = len(p.photo_mean[s])
            if n < 2:  # one photo: it cannot be both target and demonstration
                continue
            j = int(torch.randint(n, (1,), generator=g))
            others = torch.tensor([x for x in range(n) if x != j])
            pick = others[torch.randperm(n - 1, generator=g)[:k]]
            if len(pick) < k:
                pick = torch.cat([pick, others[torch.randint(n - 1, (k - len(pick),), generator=g)]])
            latents[i] = p.photo_mean[s][j] + p.photo_std[s][j] * eps[i]
            if not no_text[i]:
                text_bld[i] = p.photo_emb[s][j]
            if not no_demo[i]:
                demos_bkf[i] = p.demo_latents[s][pick]

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        dev, wd = self.p.device, self.p.weight_dtype
        latents, noisy, t, text, demos, noise = self.batch(step, micro_step)
        pred = self.forward_unet(noisy.to(dev, wd), t.to(dev), text.to(dev, wd),
                                 added_cond_kwargs={"image_embeds": [demos.to(dev, wd)]}).sample
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        loss = F.mse_loss(pred.float(), target.to(dev).float())
        return loss, {"loss": loss.item()}


def apprentice_loop_settings(p: PreparedApprentice, *, progress: bool = True) -> LoopSettings:
    return LoopSettings(p.cfg, p.cfg, autocast_dtype=p.autocast_dtype, device=p.device, progress=progress,
                        description="apprentice")


def publish_apprentice(p: PreparedApprentice, result: LoopResult, out: Path, *, wall_time_s: float,
                       overwrite: bool = True, full_state: dict[str, torch.Tensor] | None = None,
                       extra_stats: dict | None = None) -> ApprenticeInfo:
    """Write the apprentice folder atomically (weights, apprentice.json, loss history)."""
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(apprentice_state(p.base.unet, full_state), str(tmp / APPRENTICE_WEIGHTS))
        weights = [APPRENTICE_WEIGHTS]
        if p.cfg.train_unet:
            from diffusers import UNet2DConditionModel

            plain = UNet2DConditionModel.from_config({**p.base.unet.config, "encoder_hid_dim_type": None})
            state = full_state if full_state is not None else p.base.unet.state_dict()
            plain.load_state_dict({k: v.float() for k, v in state.items() if k in plain.state_dict()}, strict=True)
            plain.save_pretrained(tmp / "unet", safe_serialization=True)
            weights.append("unet")
        history = result.history
        info = ApprenticeInfo(
            identifier=p.identifier, base_model=p.base.describe, arch=dataclasses.asdict(p.cfg.arch()),
            config=to_dict(p.cfg), code_version=code_version(), input_hash=p.input_hash, dataset=p.dataset,
            final_loss=result.final_loss, wall_time_s=round(wall_time_s, 3),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), weights=weights,
            train_stats={"steps": result.final_step, "resumed_from": result.resumed_from,
                         "step_time_s": round(result.step_time_s, 3),
                         "loss_first": history[0]["loss"] if history else None, "device": str(p.device),
                         **(extra_stats or {})},
        )
        write_json(tmp / "loss_history.json", history)
        write_json(tmp / APPRENTICE_FILE, info.to_dict())
    return info


def train_apprentice(demo_set: str | Path, base: BaseModel | str, c: ApprenticeConfig, out: str | Path, *,
                     overwrite: bool = False, progress: bool = True, hooks: LoopHooks | None = None) -> ApprenticeInfo:
    """Train in this process (no Ray); resumable from the work folder beside ``out``."""
    t0 = time.perf_counter()
    out = Path(out)
    if (out / APPRENTICE_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out} already holds an apprentice; pass --overwrite or choose another --out")
    p = prepare_apprentice(demo_set, base, c)
    objective = ApprenticeObjective(p)
    work = out.parent / f".{out.name}.work"
    result = run_loop(objective, apprentice_loop_settings(p, progress=progress), checkpoint_dir=work / "checkpoints",
                      hooks=hooks)
    info = publish_apprentice(p, result, out, wall_time_s=time.perf_counter() - t0, overwrite=overwrite)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return info
