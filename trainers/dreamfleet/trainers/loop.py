"""The one training loop: single process, no Ray, no DeepSpeed.

DreamBooth (and later the apprentice) plug in an :class:`Objective` (step -> loss). The loop
owns the optimizer, the learning-rate schedule, mixed precision, gradient accumulation and
clipping, checkpoints and resume. Randomness is derived from ``(seed, step)``, never from a
global stream, so a run resumed from a checkpoint follows the uninterrupted run exactly.
A distributed runtime wraps this loop through :class:`LoopHooks` and an optional
:class:`Engine`; the loop itself never imports Ray or DeepSpeed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file

from dreamfleet.core.artifacts import atomic_dir, read_json, write_json
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import FINAL_LOSS_STEPS
from dreamfleet.trainers.config import ADDED_FIELDS, LoopConfig, OptimizerConfig

log = logging.getLogger("dreamfleet")

CKPT_PATTERN = re.compile(r"^step-(\d{8})$")


def step_generator(seed: int, step: int, stream: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """An RNG that depends only on (seed, step, stream): the basis of exact resume."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


class Objective(Protocol):
    """What a trainer plugs into the loop."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules whose ``requires_grad`` parameters are trained and checkpointed, by name."""

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one micro-batch; the batch is drawn from RNGs seeded by (step, micro_step)."""


@dataclass
class LoopSettings:
    """The loop's two config sections, taken as they are (a trainer's config is both), and
    what the trainer resolved for this run: precision, device, how to show progress."""

    optimizer: OptimizerConfig
    loop: LoopConfig
    autocast_dtype: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: bool = True
    description: str = "training"


@dataclass
class LoopHooks:
    """Callbacks for the runtime (progress reports) and the trainer (validation images, best-step
    selection). ``save_state(folder)`` writes the caller's own state into each checkpoint folder
    before it is committed; ``load_state(folder)`` reads it back on resume; ``on_start(step)``
    runs once before the first step (0, or the step resumed from)."""

    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_validation: Callable[[int], None] | None = None
    on_checkpoint: Callable[[int, Path], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_start: Callable[[int], None] | None = None
    save_state: Callable[[Path], None] | None = None
    load_state: Callable[[Path], None] | None = None


@dataclass
class LoopResult:
    final_step: int
    history: list[dict[str, float]]
    resumed_from: int | None
    wall_time_s: float
    step_time_s: float  # time inside optimizer steps only

    @property
    def final_loss(self) -> float | None:
        if not self.history:
            return None
        tail = self.history[-min(FINAL_LOSS_STEPS, len(self.history)):]
        return sum(h["loss"] for h in tail) / len(tail)


def trainable_parameters(objective: Objective) -> list[torch.nn.Parameter]:
    return [p for m in objective.trainable_modules().values() for p in m.parameters() if p.requires_grad]


def parameter_groups(objective: Objective) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the config's learning rate first, then one group per
    rate that the objective's ``learning_rates`` (by trainable module name) set apart."""
    rates: dict[str, float] = getattr(objective, "learning_rates", None) or {}
    groups: dict[float | None, list[torch.nn.Parameter]] = {None: []}
    for name, module in objective.trainable_modules().items():
        groups.setdefault(rates.get(name), []).extend(p for p in module.parameters() if p.requires_grad)
    return [{"params": ps, **({"lr": lr} if lr is not None else {})} for lr, ps in groups.items() if ps]


def trainable_state(objective: Objective) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in objective.trainable_modules().items():
        for pname, p in module.named_parameters():
            if p.requires_grad:
                state[f"{name}.{pname}"] = p.detach().to("cpu", copy=True).contiguous()
    return state


def load_trainable_state(objective: Objective, state: dict[str, torch.Tensor]) -> None:
    for name, module in objective.trainable_modules().items():
        params = dict(module.named_parameters())
        for key, value in state.items():
            mod, _, pname = key.partition(".")
            if mod == name:
                with torch.no_grad():
                    params[pname].copy_(value.to(params[pname].device, params[pname].dtype))


class Engine(Protocol):
    """Backward, optimizer step and optimizer-state checkpoints. :class:`LocalEngine` (one
    process, or DDP) is the default; the distributed runtime supplies a DeepSpeed one."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, float]: ...

    def save(self, folder: Path, *, is_main: bool) -> None: ...

    def load(self, folder: Path) -> None: ...


class LocalEngine:
    """AdamW + LR schedule + optional fp16 grad scaling + clipping, in this process."""

    def __init__(self, objective: Objective, s: LoopSettings):
        self.objective, self.s = objective, s
        self.params = trainable_parameters(objective)
        if not self.params:
            raise RuntimeError("the objective has no trainable parameters")
        self.optimizer = make_optimizer(parameter_groups(objective), s)
        self.scheduler = make_scheduler(self.optimizer, s)
        self.scaler = torch.amp.GradScaler(s.device.type) if s.autocast_dtype == torch.float16 else None
        self.ema = None
        if getattr(s.optimizer, "ema_decay", 0.0) > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=s.optimizer.ema_decay, foreach=True)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_gradients(self) -> dict[str, float]:
        """Clip the gradients to ``max_grad_norm`` (one global norm); returns the norm before clipping."""
        return {"grad_norm": float(torch.nn.utils.clip_grad_norm_(self.params, self.s.optimizer.max_grad_norm))}

    def step(self) -> dict[str, float]:
        out = {}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.s.optimizer.max_grad_norm > 0:
            out.update(self.clip_gradients())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        return out

    def finish(self) -> None:
        """At the end of training: the EMA weights (when kept) become the trained weights."""
        if self.ema is not None:
            self.ema.copy_to(self.params)

    def save(self, folder: Path, *, is_main: bool) -> None:
        if not is_main:  # replicated state (single process or DDP): rank 0 writes it
            return
        save_file(trainable_state(self.objective), str(folder / "trainable.safetensors"))
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
             "scaler": self.scaler.state_dict() if self.scaler is not None else None,
             "ema": self.ema.state_dict() if self.ema is not None else None},
            folder / "optimizer.pt",
        )

    def load(self, folder: Path) -> None:
        load_trainable_state(self.objective, load_file(str(folder / "trainable.safetensors")))
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if self.scaler is not None and opt.get("scaler"):
            self.scaler.load_state_dict(opt["scaler"])
        if self.ema is not None and opt.get("ema"):
            self.ema.load_state_dict(opt["ema"])


def make_optimizer(params: list[torch.nn.Parameter] | list[dict[str, Any]], s: LoopSettings) -> torch.optim.Optimizer:
    o = s.optimizer
    if getattr(o, "optimizer", "adamw") == "adamw8bit":
        import bitsandbytes as bnb  # 8-bit moments, block-wise quantised (Dettmers et al. 2022)

        return bnb.optim.AdamW8bit(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                   weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
    # foreach on CPU, fused on CUDA: both are the same AdamW maths, fewer kernel launches.
    fused = s.device.type == "cuda"
    return torch.optim.AdamW(
        params,
        lr=o.learning_rate,
        betas=(o.adam_beta1, o.adam_beta2),
        weight_decay=o.adam_weight_decay,
        eps=o.adam_epsilon,
        **({"fused": True} if fused else {"foreach": True}),
    )


def make_scheduler(optimizer: torch.optim.Optimizer, s: LoopSettings):
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        s.optimizer.lr_scheduler, optimizer=optimizer, num_warmup_steps=s.optimizer.lr_warmup_steps,
        num_training_steps=s.loop.steps,
    )


# --------------------------------------------------------------------------- checkpoints


def list_checkpoints(checkpoint_dir: Path | None) -> list[tuple[int, Path]]:
    if checkpoint_dir is None or not checkpoint_dir.is_dir():
        return []
    found = []
    for p in checkpoint_dir.iterdir():
        m = CKPT_PATTERN.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(checkpoint_dir: Path, step: int, engine: Engine, history: list[dict], *, is_main: bool = True,
                    config: dict[str, Any] | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint; ``state.json`` records the step, the loss history and the resolved
    config the run trains with (as litgpt and nanoGPT keep it beside the weights); ``extra``
    writes the caller's own state into the folder (rank 0)."""
    final = checkpoint_dir / f"step-{step:08d}"
    with atomic_dir(final, overwrite=True) as tmp:
        engine.save(tmp, is_main=is_main)
        if extra is not None and is_main:
            extra(tmp)
        # Only rank 0 writes the shared files: a distributed runtime merges every rank's
        # checkpoint folder into one, and two ranks' state.json would collide there.
        if is_main:
            write_json(tmp / "state.json", {"step": step, "history": history, "config": config})
    return final


# Settings a resumed run may change: they decide what is written and when, not what is trained.
RESUME_FREE_FIELDS = frozenset({
    "checkpoint_every", "checkpoints_total_limit", "validation_every", "num_validation_images",
    "validation_prompts", "validation_inference_steps", "tensorboard_dir", "mlflow_tracking_uri", "mlflow_experiment",
    "wandb_project",
})


def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The fields (dotted into sections) where ``new`` differs from ``old``, with both values."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_FREE_FIELDS:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a == "<unset>" and not prefix and key in ADDED_FIELDS and b == ADDED_FIELDS[key]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: the checkpoint has {a!r}, this run {b!r}")
    return changes


def check_resume_config(path: Path, config: dict[str, Any] | None, *, allow_change: bool = False) -> None:
    """Refuse to resume a checkpoint written with another config, naming what differs."""
    try:
        recorded = read_json(path / "state.json").get("config")
    except Exception:  # unreadable: run_loop falls back to an older checkpoint
        return
    if recorded is None or config is None:
        return
    changes = config_changes(recorded, json.loads(json.dumps(config)))
    if not changes:
        return
    if allow_change:
        log.warning("resuming %s with a changed config: %s", path, "; ".join(changes))
        return
    raise ConfigError(
        f"{path}: this checkpoint was trained with another config ({'; '.join(changes)}). Run again with "
        f"the checkpoint's values, pass --allow-config-change to resume anyway, or delete {path.parent} to "
        "start over"
    )


def load_checkpoint(path: Path, engine: Engine, extra: Callable[[Path], None] | None = None) -> tuple[int, list[dict]]:
    state = read_json(path / "state.json")  # first: a corrupt checkpoint fails before touching weights
    engine.load(path)
    if extra is not None:
        extra(path)
    return int(state["step"]), list(state["history"])


def prune_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    for _, path in list_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the loop


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
    else:
        with torch.autocast(device_type=device.type, dtype=dtype):
            yield


def run_loop(
    objective: Objective,
    s: LoopSettings,
    *,
    checkpoint_dir: Path | None = None,
    hooks: LoopHooks | None = None,
    engine: Engine | None = None,
    is_main: bool = True,
    config: dict[str, Any] | None = None,
    allow_config_change: bool = False,
) -> LoopResult:
    """Train ``objective`` for ``s.loop.steps`` optimizer steps, resuming from the newest
    checkpoint in ``checkpoint_dir`` if there is one.

    ``engine`` defaults to a :class:`LocalEngine`; ``is_main`` is False on the other ranks
    of a distributed run (they write no replicated state and show no progress bar).
    ``config`` (the resolved config) goes into every checkpoint; a checkpoint written with
    another one is not resumed (``ConfigError``) unless ``allow_config_change``.
    """
    hooks = hooks or LoopHooks()
    engine = engine or LocalEngine(objective, s)
    start, history, resumed_from = _resume(checkpoint_dir, engine, config, allow_config_change, s.description,
                                           hooks.load_state)
    if hooks.on_start is not None:
        hooks.on_start(start)
    t0 = time.perf_counter()
    step_time = 0.0
    progress = _progress(s, start) if is_main else None
    for step in range(start, s.loop.steps):
        if hooks.should_stop is not None and hooks.should_stop():
            break
        t_step = time.perf_counter()
        metrics = _optimizer_step(objective, s, step, engine)
        step_time += time.perf_counter() - t_step
        done = step + 1
        history.append({"step": done, **metrics})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if hooks.on_step is not None:
            hooks.on_step(done, metrics)
        if checkpoint_dir is not None and _due(done, s.loop.checkpoint_every, s.loop.steps):
            path = save_checkpoint(checkpoint_dir, done, engine, history, is_main=is_main, config=config,
                                   extra=hooks.save_state)
            prune_checkpoints(checkpoint_dir, s.loop.checkpoints_total_limit)
            if hooks.on_checkpoint is not None:
                hooks.on_checkpoint(done, path)
        if hooks.on_validation is not None and _due(done, s.loop.validation_every, s.loop.steps):
            hooks.on_validation(done)
    if progress is not None:
        progress.close()
    final_step = history[-1]["step"] if history else start
    if final_step == s.loop.steps and hasattr(engine, "finish"):
        engine.finish()
    if hooks.on_validation is not None and final_step == s.loop.steps:
        hooks.on_validation(final_step)
    return LoopResult(
        final_step=int(final_step),
        history=history,
        resumed_from=resumed_from,
        wall_time_s=time.perf_counter() - t0,
        step_time_s=step_time,
    )


def _resume(checkpoint_dir: Path | None, engine: Engine, config: dict[str, Any] | None, allow_change: bool,
            what: str, load_state: Callable[[Path], None] | None = None) -> tuple[int, list[dict], int | None]:
    """(start step, loss history, checkpoint step) of the newest readable checkpoint, or a fresh start."""
    for step_no, path in reversed(list_checkpoints(checkpoint_dir)):
        check_resume_config(path, config, allow_change=allow_change)
        try:
            start, history = load_checkpoint(path, engine, load_state)
        except Exception as e:  # an unreadable checkpoint: fall back to the one before it
            log.warning("%s: checkpoint %s is unreadable (%s: %s); trying an older one", what, path, type(e).__name__, e)
            continue
        log.info("resuming %s from checkpoint step %d (%s)", what, start, path)
        return start, history, step_no
    return 0, [], None


def _due(done: int, every: int, steps: int) -> bool:
    """Whether a periodic checkpoint or validation falls after step ``done`` (the last step has its own)."""
    return bool(every) and done % every == 0 and done < steps


def _optimizer_step(objective: Objective, s: LoopSettings, step: int, engine: Engine) -> dict[str, float]:
    totals: dict[str, float] = {}
    accumulate = s.loop.gradient_accumulation_steps
    for micro in range(accumulate):
        with autocast(s.device, s.autocast_dtype):
            loss, metrics = objective.loss(step, micro)
        engine.backward(loss / accumulate)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / accumulate
    totals.update(engine.step())
    if not math.isfinite(totals.get("loss", 0.0)):
        raise FloatingPointError(f"loss became {totals['loss']} at step {step + 1}; lower the learning rate")
    return totals


def _progress(s: LoopSettings, start: int) -> Any:
    if not s.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=s.loop.steps, initial=start, desc=s.description, unit="step", dynamic_ncols=True, leave=False)
