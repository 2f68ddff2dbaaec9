"""Best step per subject: score the model while it trains and publish its best step.

Every ``select_every`` steps (and at the last) the :class:`Selector` renders a few fixed-seed
images of the subject's prompts with the weights being trained, and a scorer rates them:
subject similarity to the subject's photos and prompt fidelity to each prompt (the identifier
left out). The base model is scored the same way before the first step. The published step is
the one with the highest subject similarity among those whose prompt fidelity is at least
``select_prompt_bar`` of the base model's; when none qualifies, the one with the highest prompt
fidelity (recorded as a fallback). With ``select_patience`` M, training ends once the best
qualifying score has not improved for M evaluations.

The scorer is named by the config and found as a ``dreamfleet.scorers`` entry point (``toy``:
the toy judge; ``dino``: DINO and CLIP-T from local folders) or a ``package.module:factory``
plugin: the trainer itself knows no metric. The selection state (scores and the best weights)
goes into every checkpoint, so a resumed run chooses as the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dreamfleet.core.artifacts import read_json, write_json
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.identifiers import fill_prompt
from dreamfleet.trainers.loop import LoopHooks, Objective, load_trainable_state, trainable_state

log = logging.getLogger("dreamfleet")

SCORER_ENTRY_POINTS = "dreamfleet.scorers"
STATE_FILE, BEST_FILE = "selection.json", "selection_best.safetensors"


class Scorer(Protocol):
    """Per-image scores: ``subject`` against the subject's photos, ``prompt`` against each image's prompt."""

    def subject(self, generated: list[Image.Image], real: list[Image.Image]) -> list[float]: ...

    def prompt(self, generated: list[Image.Image], prompts: list[str]) -> list[float]: ...


def load_scorer(cfg: Any, device: str = "cpu") -> Scorer:
    """The config's scorer: an entry point of ``dreamfleet.scorers`` or ``package.module:factory``."""
    from importlib.metadata import entry_points

    name = cfg.select_scorer
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"select_scorer {name!r}: cannot import it ({e})") from e
    else:
        found = {ep.name: ep for ep in entry_points(group=SCORER_ENTRY_POINTS)}
        if name not in found:
            raise ConfigError(f"unknown select_scorer {name!r}; installed: {', '.join(sorted(found)) or 'none'}, "
                              "or give a plugin as 'package.module:factory'")
        factory = found[name].load()
    return factory(dino_model=cfg.select_dino_model, clip_model=cfg.select_clip_model, device=device)


@dataclass
class SelectionState:
    """What a checkpoint keeps of the selection: the base scores, every step's, the best one."""

    base: dict[str, float] | None = None
    scores: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    since_best: int = 0  # evaluations since the best qualifying score last improved
    best_weights: dict[str, torch.Tensor] | None = None

    def save(self, folder: Path) -> None:
        write_json(folder / STATE_FILE, {"base": self.base, "scores": self.scores, "best_step": self.best_step,
                                         "since_best": self.since_best})
        if self.best_weights is not None:
            save_file(self.best_weights, str(folder / BEST_FILE))

    @classmethod
    def load(cls, folder: Path) -> SelectionState:
        if not (folder / STATE_FILE).is_file():
            return cls()
        data = read_json(folder / STATE_FILE)
        weights = load_file(str(folder / BEST_FILE)) if (folder / BEST_FILE).is_file() else None
        return cls(data["base"], data["scores"], data["best_step"], data["since_best"], weights)


class Selector:
    """Scores one prepared subject every ``select_every`` steps and keeps its best weights."""

    def __init__(self, p: Any, objective: Objective, scorer: Scorer, engine: Any = None):
        self.p, self.cfg, self.objective, self.scorer, self.engine = p, p.cfg, objective, scorer, engine
        templates = p.cfg.select_prompts or p.subject.prompts or p.cfg.validation_prompts
        self.templates = list(templates)
        self.prompts = [fill_prompt(t, p.identifier, p.subject.class_noun) for t in self.templates]
        self.plain = [fill_prompt(t, "", p.subject.class_noun) for t in self.templates]
        self.state = SelectionState()
        self.eval_seconds = 0.0

    # ------------------------------------------------------------------ the loop's hooks

    def hooks(self, inner: LoopHooks) -> LoopHooks:
        """``inner`` with evaluation after each due step (its scores passed on as ``eval_*``
        metrics), the base scored before the first step, the state in every checkpoint and
        early stop."""
        def on_step(step: int, metrics: dict[str, float]) -> None:
            if step % self.cfg.select_every == 0 or step == self.cfg.steps:
                metrics = {**metrics, **{f"eval_{k}": v for k, v in self.evaluate(step).items()
                                         if k in ("subject", "prompt", "prompt_ratio")}}
            if inner.on_step is not None:
                inner.on_step(step, metrics)

        def should_stop() -> bool:
            return (inner.should_stop is not None and inner.should_stop()) or self.stop

        return replace(inner, on_step=on_step, should_stop=should_stop, on_start=self.on_start,
                       save_state=self.state_saver(inner.save_state), load_state=self.load)

    def state_saver(self, inner):
        def save(folder: Path) -> None:
            if inner is not None:
                inner(folder)
            self.state.save(folder)

        return save

    def load(self, folder: Path) -> None:
        self.state = SelectionState.load(folder)

    def on_start(self, step: int) -> None:
        if self.state.base is None:  # a fresh run (or one resumed from a checkpoint without selection)
            scores = self._score(self.plain, step)
            self.state.base = {"step": step, "subject": scores["subject"], "prompt": scores["prompt"]}
            log.info("%s: base scores %s", self.p.subject.subject_id, self._fmt(scores))

    @property
    def stop(self) -> bool:
        patience = self.cfg.select_patience
        return bool(patience) and self.state.best_step is not None and self.state.since_best >= patience

    # ------------------------------------------------------------------ scoring

    @contextlib.contextmanager
    def _eval_weights(self) -> Iterator[None]:
        """The weights that would be published: the EMA when the engine keeps one."""
        ema = getattr(self.engine, "ema", None)
        if ema is None:
            yield
            return
        params = self.engine.params
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    def _score(self, prompts: list[str], step: int) -> dict[str, float]:
        from dreamfleet.trainers.dreambooth import validation_images

        t0 = time.perf_counter()
        n = self.cfg.select_images
        images = validation_images(self.p, prompts, seed=self.cfg.seed, n=n, steps=self.cfg.select_inference_steps,
                                   guidance_scale=self.cfg.select_guidance_scale)
        subject = self.scorer.subject(images, list(self.p.subject.images))
        prompt = self.scorer.prompt(images, [q for q in self.plain for _ in range(n)])
        seconds = time.perf_counter() - t0
        self.eval_seconds += seconds
        return {"step": step, "subject": sum(subject) / len(subject), "prompt": sum(prompt) / len(prompt),
                "seconds": round(seconds, 3)}

    def evaluate(self, step: int) -> dict[str, Any]:
        """Score the weights at ``step``, record it, and keep the weights when it is the new best."""
        with self._eval_weights():
            s = self._score(self.prompts, step)
            s["prompt_ratio"] = s["prompt"] / self.state.base["prompt"] if self.state.base["prompt"] else 0.0
            s["qualifies"] = s["prompt_ratio"] >= self.cfg.select_prompt_bar
            scores = [x for x in self.state.scores if x["step"] != step] + [s]  # a resumed run re-scores a step
            self.state.scores = sorted(scores, key=lambda x: x["step"])
            if self._is_best(s):
                self.state.best_step, self.state.since_best = step, 0
                self.state.best_weights = trainable_state(self.objective)
            else:
                self.state.since_best += 1
        log.info("%s step %d: %s%s", self.p.subject.subject_id, step, self._fmt(s),
                 " (best)" if self.state.best_step == step else "")
        return s

    def _is_best(self, s: dict[str, Any]) -> bool:
        """Whether ``s`` beats the best so far under the rule (a qualifying step beats any
        fallback; among fallbacks the higher prompt fidelity wins)."""
        best = next((x for x in self.state.scores if x["step"] == self.state.best_step), None)
        if best is None:
            return True
        if s["qualifies"] != best["qualifies"]:
            return s["qualifies"]
        return s["subject"] > best["subject"] if s["qualifies"] else s["prompt"] > best["prompt"]

    @staticmethod
    def _fmt(s: dict[str, Any]) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in s.items() if isinstance(v, float) and k != "seconds")

    # ------------------------------------------------------------------ the end

    def finish(self, final_step: int) -> dict[str, Any]:
        """Load the best step's weights into the trained modules; returns what the expert records."""
        st = self.state
        if st.best_weights is not None and st.best_step != final_step:
            load_trainable_state(self.objective, st.best_weights)
        best = next((x for x in st.scores if x["step"] == st.best_step), None)
        return {
            "rule": (f"highest subject similarity among the evaluated steps whose prompt fidelity is at least "
                     f"{self.cfg.select_prompt_bar} of the base model's; if none is, the highest prompt fidelity"),
            "scorer": self.cfg.select_scorer, "every": self.cfg.select_every, "prompt_bar": self.cfg.select_prompt_bar,
            "patience": self.cfg.select_patience, "prompts": self.templates, "images_per_prompt": self.cfg.select_images,
            "inference_steps": self.cfg.select_inference_steps, "base": st.base, "scores": st.scores,
            "chosen_step": st.best_step, "fallback": bool(best and not best["qualifies"]),
            "stopped_early": final_step < self.cfg.steps, "final_step": final_step,
            "eval_seconds": round(self.eval_seconds, 3),
        }


def selector_for(p: Any, objective: Objective, engine: Any, *, world_size: int, zero_stage: int) -> Selector | None:
    """The subject's selector when its config selects a step (one process, no DeepSpeed), else None."""
    if not p.cfg.select_every:
        return None
    if world_size > 1 or zero_stage:
        raise ConfigError(f"subject {p.subject.subject_id!r}: select_every scores the weights on one process; train "
                          "it with --workers-per-subject 1 and no --zero-stage, or drop --select-every")
    return Selector(p, objective, load_scorer(p.cfg, str(p.device)), engine)
