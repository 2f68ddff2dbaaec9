"""Pretraining the toy base model on the toy world, on a CPU in under an hour.

Two stages, each a plain :class:`~dreamfleet.trainers.loop.Objective` run by the project's
one training loop (checkpoints and exact resume included):

1. the VAE learns to reconstruct world renders (MSE + a tiny KL term), then its latent
   scaling factor is set so latents have unit variance, as Stable Diffusion's are;
2. the UNet and the text encoder learn to denoise latents of a pool of rendered scenes
   given their captions (epsilon prediction). Each step draws a fresh caption of every
   scene (attributes dropped at random, so "a ball" and "a red striped ball on the beach"
   both describe it), and 10% of captions are empty so classifier-free guidance works.

``minutes`` is turned into step counts by timing a few steps on a copy, before training;
the counts are recorded in ``pretrain.json``, and passing them back (``vae_steps``,
``unet_steps``) reproduces the model whatever the machine's speed.
"""

from __future__ import annotations

import copy
import json
import logging
import platform as stdlib_platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreamfleet.core.artifacts import atomic_dir, read_json, write_json
from dreamfleet.core.config import cfg, to_dict
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.images import image_grid
from dreamfleet.core.models import BaseModel, state_dict_hash
from dreamfleet.core.version import code_version
from dreamfleet.toy.flux import build_untrained_flux
from dreamfleet.toy.model import build_untrained
from dreamfleet.toy.world import caption, render, scene_rng, world_sample
from dreamfleet.trainers.config import LoopConfig, OptimizerConfig
from dreamfleet.trainers.loop import LoopHooks, LoopSettings, run_loop, step_generator

log = logging.getLogger("dreamfleet")

SAMPLE_PROMPTS = [
    "a red ball on the grass", "a blue box in the snow", "a yellow kite on the beach", "a purple cup at night",
    "a orange striped ball on a rug", "a pink dotted box on the beach", "a blue checkered cup on the grass",
    "a red kite in the snow",
]


@dataclass
class PretrainConfig:
    """How the toy model is pretrained."""

    model: str = cfg("toy", "which toy model: 'toy' (the UNet) or 'toy-flux' (the Flux transformer)")
    seed: int = cfg(0, "seed of the weights, the world stream and every noise draw")
    minutes: float = cfg(46.0, "wall-clock budget of both stages; ignored for a stage whose steps are given")
    vae_fraction: float = cfg(0.15, "share of the budget given to the VAE stage")
    vae_steps: int | None = cfg(None, "VAE optimizer steps (default: from the budget)")
    unet_steps: int | None = cfg(None, "UNet + text encoder optimizer steps (default: from the budget)")
    batch_size: int = cfg(32, "images per step in both stages")
    vae_learning_rate: float = cfg(1e-3, "VAE peak learning rate")
    learning_rate: float = cfg(6e-4, "UNet and text encoder peak learning rate")
    warmup_steps: int = cfg(200, "linear warm-up steps of each stage (capped at a tenth of its steps)")
    kl_weight: float = cfg(1e-6, "weight of the VAE's KL term")
    pool_size: int = cfg(30000, "scenes rendered and encoded once for the UNet stage")
    caption_keep: float = cfg(0.8, "probability that a caption keeps each attribute of its scene")
    empty_caption: float = cfg(0.1, "share of empty captions (for classifier-free guidance)")
    init_from: str | None = cfg(None, "start the denoiser stage from this pretrained folder's weights (a second "
                                "stage of the same model; its pretrain.json is kept in the new record)")
    threads: int = cfg(1, "torch CPU threads")
    checkpoint_every: int = cfg(500, "checkpoint every N steps (resumable)")

    def __post_init__(self) -> None:
        steps_given = self.unet_steps is not None and (self.vae_steps is not None or self.model == "toy-flux")
        if self.minutes <= 0 and not steps_given:
            raise ConfigError("minutes must be positive unless the steps are given (vae_steps and unet_steps; "
                              "unet_steps for toy-flux, which has no VAE stage)")
        if self.model not in ("toy", "toy-flux"):
            raise ConfigError(f"model must be 'toy' or 'toy-flux', got {self.model!r}")
        if not 0 < self.vae_fraction < 1:
            raise ConfigError(f"vae_fraction must be between 0 and 1, got {self.vae_fraction}")
        for name in ("batch_size", "pool_size", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


def pixels(images: list[Image.Image]) -> torch.Tensor:
    """uint8 RGB images -> (B, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class VaeObjective:
    """Reconstruction of fresh world renders: step ``s`` sees images ``s*B .. s*B+B-1``."""

    def __init__(self, base: BaseModel, c: PretrainConfig):
        self.vae, self.c = base.vae, c

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        b = self.c.batch_size
        x_bchw = pixels([world_sample(self.c.seed + 1, step * b + i)[0] for i in range(b)])
        g = step_generator(self.c.seed, step, stream=micro_step)
        dist = self.vae.encode(x_bchw).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon_bchw = self.vae.decode(z).sample
        mse = F.mse_loss(recon_bchw, x_bchw)
        kl = dist.kl().mean() / z[0].numel()
        # L1 keeps the thin stripes and dots sharp where MSE alone blurs them.
        loss = mse + 0.5 * F.l1_loss(recon_bchw, x_bchw) + self.c.kl_weight * kl
        return loss, {"loss": loss.item(), "mse": mse.item()}


class LatentPool:
    """A fixed pool of rendered scenes, encoded once: the UNet stage's data."""

    def __init__(self, base: BaseModel, c: PretrainConfig, chunk: int = 256):
        self.scenes = [world_sample(c.seed + 2, i)[2] for i in range(c.pool_size)]
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(self.scenes), chunk):
                x = pixels([render(s) for s in self.scenes[i:i + chunk]])
                dist = base.vae.encode(x).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self.mean_bchw, self.std_bchw = torch.cat(means), torch.cat(stds)


class DenoiseObjective:
    """Epsilon-prediction loss of the UNet and text encoder on captioned pool scenes."""

    def __init__(self, base: BaseModel, c: PretrainConfig, pool: LatentPool):
        self.base, self.c, self.pool = base, c, pool
        self.scaling = float(base.vae.config.scaling_factor)
        self._ids: dict[str, torch.Tensor] = {}

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.base.unet, "text_encoder": self.base.text_encoder}

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        tok = self.base.tokenizer
        for p in prompts:
            if p not in self._ids:
                self._ids[p] = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                                   return_tensors="pt").input_ids[0]
        return torch.stack([self._ids[p] for p in prompts])

    def draw(self, step: int, micro_step: int) -> tuple[torch.Generator, list[str], torch.Tensor]:
        """The step's generator, captions and VAE latent samples (unscaled) of its pool scenes."""
        c = self.c
        g = step_generator(c.seed, step, stream=micro_step)
        idx = torch.randint(len(self.pool.scenes), (c.batch_size,), generator=g)
        rng = scene_rng(c.seed, step, stream=3)
        prompts = [
            "" if rng.random() < c.empty_caption else caption(self.pool.scenes[int(i)], rng, keep=c.caption_keep)
            for i in idx
        ]
        eps = torch.randn(self.pool.mean_bchw[idx].shape, generator=g)
        return g, prompts, self.pool.mean_bchw[idx] + self.pool.std_bchw[idx] * eps

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.c
        g, prompts, sample_bchw = self.draw(step, micro_step)
        latents_bchw = sample_bchw * self.scaling
        noise_bchw = torch.randn(latents_bchw.shape, generator=g)
        sched = self.base.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (c.batch_size,), generator=g)
        noisy_bchw = sched.add_noise(latents_bchw, noise_bchw, t)
        cond = self.base.text_encoder(self.token_ids(prompts))[0]
        pred_bchw = self.base.unet(noisy_bchw, t, cond).sample
        loss = F.mse_loss(pred_bchw, noise_bchw)
        return loss, {"loss": loss.item()}


@dataclass(frozen=True)
class FlowSampling:
    """Noise levels of the toy Flux's pretraining: logit-normal σ (SD3 paper, §3.1; what
    diffusers' Flux scripts call ``weighting_scheme="logit_normal"``), unweighted MSE."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance_scale: float = 1.0  # unused: the toy Flux has no guidance embedding


class FlowObjective(DenoiseObjective):
    """Rectified-flow velocity loss of the transformer and both text encoders on captioned pool
    scenes, through the Flux family module (the same targets DreamBooth trains on)."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"transformer": self.base.transformer, "text_encoder": self.base.text_encoder,
                "text_encoder_2": self.base.text_encoder_2}

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        family = self.base.kind
        g, prompts, sample_bchw = self.draw(step, micro_step)
        latents_bchw = family.latents(self.base, sample_bchw)
        noise_bchw = torch.randn(latents_bchw.shape, generator=g)
        batch = family.noisy_batch(self.base, FlowSampling(), latents_bchw, noise_bchw, g)
        cond = family.encode(self.base, family.tokenize(self.base, prompts, latents_bchw.device))
        pred_bchw = family.predict(self.base.transformer, batch, cond, FlowSampling())
        loss = F.mse_loss(pred_bchw, batch.target)
        return loss, {"loss": loss.item()}


def time_steps(objective, n: int = 3) -> float:
    """Seconds per optimizer step of ``objective`` (build it over a copy of the model: this trains it)."""
    params = [p for m in objective.trainable_modules().values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-6)
    elapsed = 0.0
    for i in range(n + 1):
        t0 = time.perf_counter()
        loss, _ = objective.loss(10_000_000 + i, 0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:  # the first step pays one-off costs
            elapsed += time.perf_counter() - t0
    return elapsed / n


def _settings(steps: int, lr: float, c: PretrainConfig, what: str, progress: bool) -> LoopSettings:
    optimizer = OptimizerConfig(learning_rate=lr, lr_scheduler="cosine", lr_warmup_steps=min(c.warmup_steps, steps // 10),
                                adam_weight_decay=0.0)
    loop = LoopConfig(steps=steps, checkpoint_every=c.checkpoint_every, validation_every=0)
    return LoopSettings(optimizer, loop, description=what, progress=progress and sys.stderr.isatty())


def _log_hook(what: str, steps: int, deadline: float | None = None, every: int = 250) -> LoopHooks:
    """Progress as log lines (a background run has no terminal for a progress bar), and a
    stop at ``deadline`` (perf_counter seconds) when a busy machine runs slower than timed."""
    recent: list[float] = []

    def should_stop() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    def on_step(step: int, metrics: dict[str, float]) -> None:
        recent.append(metrics["loss"])
        if step % every == 0 or step == steps:
            log.info("%s step %d/%d loss %.4f", what, step, steps, sum(recent) / len(recent))
            recent.clear()

    return LoopHooks(on_step=on_step, should_stop=should_stop)


def loss_summary(history: list[dict[str, float]], points: int = 12) -> list[dict[str, float]]:
    """The loss curve as a few (step, mean loss of the window ending there) points."""
    if not history:
        return []
    window = max(1, len(history) // points)
    out = []
    for end in range(window, len(history) + 1, window):
        chunk = history[end - window:end]
        out.append({"step": int(chunk[-1]["step"]), "loss": round(sum(h["loss"] for h in chunk) / len(chunk), 5)})
    return out


@torch.no_grad()
def sample_images(base: BaseModel, prompts: list[str], *, per_prompt: int = 6, seed: int = 0,
                  steps: int = 25, guidance_scale: float = 4.0) -> dict[str, list[Image.Image]]:
    """``per_prompt`` samples of each prompt, noise seeds ``seed + 1000 * i + j`` (prompt i, sample j)."""
    pipe = base.pipeline()
    out = {}
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator("cpu").manual_seed(seed + 1000 * i + j) for j in range(per_prompt)]
        out[prompt] = pipe([prompt] * per_prompt, height=32, width=32, num_inference_steps=steps,
                           guidance_scale=guidance_scale, generator=gens).images
    return out


def sample_grid(base: BaseModel, prompts: list[str], **kw) -> Image.Image:
    """One row of samples per prompt (:func:`sample_images`)."""
    rows = sample_images(base, prompts, **kw)
    return image_grid([im for row in rows.values() for im in row], rows=len(prompts), cols=len(next(iter(rows.values()))))


def pretrain(c: PretrainConfig, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Pretrain the toy model into the diffusers folder ``out``; returns the record written to pretrain.json."""
    out = Path(out)
    if (out / "model_index.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a model; pass --overwrite to replace it")
    threads = torch.get_num_threads()
    torch.set_num_threads(c.threads)
    try:
        return _pretrain(c, out, overwrite=overwrite, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _pretrain(c: PretrainConfig, out: Path, *, overwrite: bool, progress: bool) -> dict:
    t_start = time.perf_counter()
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.json"
    plan = read_json(plan_path) if plan_path.is_file() else {}
    budget_s = c.minutes * 60
    flux = c.model == "toy-flux"
    base = build_untrained_flux(c.seed) if flux else build_untrained(c.seed)
    if c.init_from:
        _load_weights(base, Path(c.init_from))
    vae_result, vae_s = (None, 0.0) if flux else _vae_stage(base, c, work, plan, budget_s, progress)

    # The denoiser and text encoder(s) on a pool of encoded scenes.
    t0 = time.perf_counter()
    pool = LatentPool(base, c)
    set_latent_stats(base, pool, shift=flux)
    pool_s = time.perf_counter() - t0
    objective_type = FlowObjective if flux else DenoiseObjective
    if "unet_steps" not in plan:
        left = budget_s - (time.perf_counter() - t_start)
        plan["unet_steps"] = c.unet_steps or max(50, int(left / time_steps(objective_type(copy.deepcopy(base), c, pool))))
        write_json(plan_path, plan)
    objective = objective_type(base, c, pool)
    for m in objective.trainable_modules().values():
        m.train()
    # Given steps are honoured; a budgeted run stops at 125% of its budget whatever the machine's load.
    deadline = None if c.unet_steps else t_start + 1.25 * budget_s
    what = base.kind.denoiser
    t0 = time.perf_counter()
    result = run_loop(objective, _settings(plan["unet_steps"], c.learning_rate, c, f"{c.model} {what}", progress),
                      checkpoint_dir=work / f"{what}-checkpoints", hooks=_log_hook(what, plan["unet_steps"], deadline))
    unet_s = time.perf_counter() - t0
    for m in objective.trainable_modules().values():
        m.eval().requires_grad_(False)
    record = _record(c, base, plan, vae_result, result, t_start, {"vae": vae_s, "pool": pool_s, what: unet_s})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        write_json(tmp / "pretrain.json", record)
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s written to %s (%s)", c.model, out,
             json.dumps({k: record[k] for k in ("vae_steps", "unet_steps", "wall_time_s")}))
    return record


def _vae_stage(base: BaseModel, c: PretrainConfig, work: Path, plan: dict, budget_s: float, progress: bool):
    """Stage 1 of the toy UNet model: the VAE (the toy Flux reuses the result)."""
    if "vae_steps" not in plan:
        plan["vae_steps"] = c.vae_steps or max(50, int(budget_s * c.vae_fraction / time_steps(VaeObjective(copy.deepcopy(base), c))))
        write_json(work / "plan.json", plan)
    base.vae.train()
    t0 = time.perf_counter()
    result = run_loop(VaeObjective(base, c), _settings(plan["vae_steps"], c.vae_learning_rate, c, "toy vae", progress),
                      checkpoint_dir=work / "vae-checkpoints", hooks=_log_hook("vae", plan["vae_steps"]))
    base.vae.eval().requires_grad_(False)
    return result, time.perf_counter() - t0


def _load_weights(base: BaseModel, folder: Path) -> None:
    """Every weight of a saved toy model of the same kind (a second stage starts from it)."""
    from dreamfleet.core.models import load_folder

    src = load_folder(folder, spec=str(folder))
    if src.family != base.family:
        raise ConfigError(f"init_from {folder} is a {src.family} model, not a {base.family} one")
    for name, module in base.modules().items():
        module.load_state_dict(src.modules()[name].state_dict())
    base.vae.register_to_config(**{k: src.vae.config[k] for k in ("scaling_factor", "shift_factor")})


def set_latent_stats(base: BaseModel, pool: LatentPool, *, shift: bool) -> None:
    """Scale (and, Flux-style, shift) the VAE's latents to zero mean and unit variance."""
    sample = pool.mean_bchw[:2048]
    mean = float(sample.mean()) if shift else 0.0
    base.vae.register_to_config(scaling_factor=float(1.0 / (sample - mean).std()))
    if shift:
        base.vae.register_to_config(shift_factor=mean)


def _record(c: PretrainConfig, base: BaseModel, plan: dict, vae_result, result, t_start: float,
            stage_s: dict[str, float]) -> dict:
    """What pretrain.json says about a run."""
    return {
        "script": "dreamfleet toy pretrain (dreamfleet.toy.pretrain.pretrain)",
        "command": " ".join(sys.argv),
        "config": to_dict(c),
        "model": c.model,
        "seed": c.seed,
        "vae_steps": plan.get("vae_steps", 0),
        "vae_from": "the shipped toy model's VAE (frozen)" if vae_result is None else None,
        "init_from": read_json(Path(c.init_from) / "pretrain.json") if c.init_from else None,
        "unet_steps": result.final_step,
        "unet_steps_planned": plan["unet_steps"],
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "stage_time_s": {k: round(v, 1) for k, v in stage_s.items()},
        "resumed": {"vae": vae_result.resumed_from if vae_result else None, "denoiser": result.resumed_from},
        "vae_loss": loss_summary(vae_result.history) if vae_result else [],
        "unet_loss": loss_summary(result.history),
        "final_loss": {"vae": vae_result.final_loss if vae_result else None, "denoiser": result.final_loss},
        "latent_scaling_factor": float(base.vae.config.scaling_factor),
        "latent_shift_factor": base.vae.config.shift_factor,
        "weights_hash": state_dict_hash(*base.modules().values()),
        "code_version": code_version(),
        "machine": {"torch": torch.__version__, "threads": c.threads, "processor": stdlib_platform.processor(),
                    "cpu_count": __import__("os").cpu_count()},
    }
