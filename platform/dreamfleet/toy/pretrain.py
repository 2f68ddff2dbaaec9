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
    threads: int = cfg(1, "torch CPU threads")
    checkpoint_every: int = cfg(500, "checkpoint every N steps (resumable)")

    def __post_init__(self) -> None:
        if self.minutes <= 0 and (self.vae_steps is None or self.unet_steps is None):
            raise ConfigError("minutes must be positive unless vae_steps and unet_steps are both given")
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


def latent_scaling_factor(pool: LatentPool) -> float:
    """1 / std of the latents, as Stable Diffusion's 0.18215 is for its VAE."""
    return float(1.0 / pool.mean_bchw[:2048].std())


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

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.c
        g = step_generator(c.seed, step, stream=micro_step)
        idx = torch.randint(len(self.pool.scenes), (c.batch_size,), generator=g)
        rng = scene_rng(c.seed, step, stream=3)
        prompts = [
            "" if rng.random() < c.empty_caption else caption(self.pool.scenes[int(i)], rng, keep=c.caption_keep)
            for i in idx
        ]
        eps = torch.randn(self.pool.mean_bchw[idx].shape, generator=g)
        latents_bchw = (self.pool.mean_bchw[idx] + self.pool.std_bchw[idx] * eps) * self.scaling
        noise_bchw = torch.randn(latents_bchw.shape, generator=g)
        sched = self.base.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (c.batch_size,), generator=g)
        noisy_bchw = sched.add_noise(latents_bchw, noise_bchw, t)
        cond = self.base.text_encoder(self.token_ids(prompts))[0]
        pred_bchw = self.base.unet(noisy_bchw, t, cond).sample
        loss = F.mse_loss(pred_bchw, noise_bchw)
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
def sample_grid(base: BaseModel, prompts: list[str], *, per_prompt: int = 6, seed: int = 0,
                steps: int = 25, guidance_scale: float = 4.0) -> Image.Image:
    """One row of ``per_prompt`` samples per prompt."""
    pipe = base.pipeline()
    images = []
    for i, prompt in enumerate(prompts):
        gens = [torch.Generator("cpu").manual_seed(seed + 1000 * i + j) for j in range(per_prompt)]
        images += pipe([prompt] * per_prompt, height=32, width=32, num_inference_steps=steps,
                       guidance_scale=guidance_scale, generator=gens).images
    return image_grid(images, rows=len(prompts), cols=per_prompt)


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
    base = build_untrained(c.seed)
    budget_s = c.minutes * 60

    # Stage 1: the VAE.
    vae_obj = VaeObjective(base, c)
    if "vae_steps" not in plan:
        plan["vae_steps"] = c.vae_steps or max(50, int(budget_s * c.vae_fraction / time_steps(VaeObjective(copy.deepcopy(base), c))))
        write_json(plan_path, plan)
    base.vae.train()
    t0 = time.perf_counter()
    vae_result = run_loop(vae_obj, _settings(plan["vae_steps"], c.vae_learning_rate, c, "toy vae", progress),
                          checkpoint_dir=work / "vae-checkpoints", hooks=_log_hook("vae", plan["vae_steps"]))
    vae_s = time.perf_counter() - t0
    base.vae.eval().requires_grad_(False)

    # Stage 2: UNet + text encoder on a pool of encoded scenes.
    t0 = time.perf_counter()
    pool = LatentPool(base, c)
    base.vae.register_to_config(scaling_factor=latent_scaling_factor(pool))
    pool_s = time.perf_counter() - t0
    den_obj = DenoiseObjective(base, c, pool)
    if "unet_steps" not in plan:
        left = budget_s - (time.perf_counter() - t_start)
        per_step = time_steps(DenoiseObjective(copy.deepcopy(base), c, pool))
        plan["unet_steps"] = c.unet_steps or max(50, int(left / per_step))
        write_json(plan_path, plan)
    base.unet.train()
    base.text_encoder.train()
    # Given steps are honoured; a budgeted run stops at 125% of its budget whatever the machine's load.
    deadline = None if c.unet_steps else t_start + 1.25 * budget_s
    t0 = time.perf_counter()
    unet_result = run_loop(den_obj, _settings(plan["unet_steps"], c.learning_rate, c, "toy unet", progress),
                           checkpoint_dir=work / "unet-checkpoints", hooks=_log_hook("unet", plan["unet_steps"], deadline))
    unet_s = time.perf_counter() - t0
    for m in (base.unet, base.text_encoder):
        m.eval().requires_grad_(False)

    record = {
        "script": "dreamfleet toy pretrain (dreamfleet.toy.pretrain.pretrain)",
        "command": " ".join(sys.argv),
        "config": to_dict(c),
        "seed": c.seed,
        "vae_steps": plan["vae_steps"],
        "unet_steps": unet_result.final_step,
        "unet_steps_planned": plan["unet_steps"],
        "wall_time_s": round(time.perf_counter() - t_start, 1),
        "stage_time_s": {"vae": round(vae_s, 1), "pool": round(pool_s, 1), "unet": round(unet_s, 1)},
        "resumed": {"vae": vae_result.resumed_from, "unet": unet_result.resumed_from},
        "vae_loss": loss_summary(vae_result.history),
        "unet_loss": loss_summary(unet_result.history),
        "final_loss": {"vae": vae_result.final_loss, "unet": unet_result.final_loss},
        "latent_scaling_factor": float(base.vae.config.scaling_factor),
        "weights_hash": state_dict_hash(base.unet, base.vae, base.text_encoder),
        "code_version": code_version(),
        "machine": {"torch": torch.__version__, "threads": c.threads, "processor": stdlib_platform.processor(),
                    "cpu_count": __import__("os").cpu_count()},
    }
    with atomic_dir(out, overwrite=overwrite) as tmp:
        base.save_pretrained(tmp)
        write_json(tmp / "pretrain.json", record)
    shutil.rmtree(work, ignore_errors=True)
    log.info("toy model written to %s (%s)", out, json.dumps({k: record[k] for k in ("vae_steps", "unet_steps", "wall_time_s")}))
    return record
