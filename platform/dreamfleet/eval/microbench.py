"""DreamBooth's claims on the toy world: base model vs DreamBooth without and with prior preservation.

For each toy subject, with fixed seeds: the base model is evaluated on the subject's prompts
(identifier left out: it means nothing to the base model); then DreamBooth is trained twice
from the same base on the subject's manifest photos, without and with the prior-preservation
loss, and each expert is evaluated the same way. The toy metrics then show (or fail to show)
the paper's three effects: subject fidelity far above the base model's, prompt fidelity close
to the base model's, and class drift lower with prior preservation than without.

This is control-plane code (it drives the trainer); the trainer knows nothing of the toy world.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dreamfleet.eval.evaluate import EvalConfig, Scorers, SubjectCase, evaluate_case, write_table

log = logging.getLogger("dreamfleet")


# The DreamBooth recipe of each toy base model (docs/microbench.md has the sweeps behind them).
#
# toy (UNet): full fine-tuning, as in the paper. The learning rate follows the paper's ratio to
# pretraining: DreamBooth fine-tunes Stable Diffusion (pretrained at 1e-4) at 5e-6, 1/20 of it;
# the toy model was pretrained at a peak of 6e-4, so 3e-5. At 3e-4 (half the pretraining rate)
# the fine-tune rewrites the model: its images stop changing with the prompt.
#
# toy-flux (rectified-flow transformer): LoRA, as Flux is fine-tuned in practice (diffusers'
# train_dreambooth_lora_flux.py; a full fine-tune is not offered for Flux here), at the rate and
# step count that the sweep of docs/microbench.md chose.
RECIPES: dict[str, dict[str, Any]] = {
    "toy": dict(method="full", steps=1200, learning_rate=3e-5),
    "toy-flux": dict(method="lora", lora_rank=16, steps=1600, learning_rate=1e-3),
}


def microbench_train_config(base_spec: str = "toy", **overrides):
    """The microbench's DreamBooth recipe for a base model (``RECIPES``; another base model gets
    the toy UNet's recipe when its family can be fully fine-tuned, else the toy Flux's)."""
    from dreamfleet.trainers.config import TrainConfig

    kw: dict[str, Any] = dict(
        batch_size=1, num_class_images=50, class_generation_steps=25, class_guidance_scale=4.0,
        prior_loss_weight=1.0, checkpoint_every=0, validation_every=0, num_validation_images=1,
        validation_inference_steps=2, validation_prompts=["a {identifier} {class_noun}"], seed=0, device="cpu",
    )
    kw.update(RECIPES.get(base_spec) or RECIPES[_recipe_like(base_spec)])
    kw.update(overrides)
    return TrainConfig(**kw)


def _recipe_like(base_spec: str) -> str:
    from dreamfleet.core.models import load_base

    return "toy" if load_base(base_spec, fresh=False).kind.support.full == "yes" else "toy-flux"


@dataclass
class MicrobenchConfig:
    subjects: list[str] = field(default_factory=list)
    """Subject ids (default: all toy subjects)."""
    train: dict[str, Any] = field(default_factory=dict)
    """Overrides of the DreamBooth recipe (TrainConfig fields)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt templates ('{0}' identifier, '{1}' class noun; default: the manifest's)."""
    images_per_prompt: int = 4
    class_images: int = 8
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    seed: int = 0


def run_microbench(out: str | Path, c: MicrobenchConfig | None = None, *, base_spec: str = "toy") -> list[dict]:
    """Train and evaluate; writes ``results.csv``/``results.md``, grids and experts under ``out``."""
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.subjects import SUBJECTS, write_subjects_manifest
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    c = c or MicrobenchConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest_dir = out / "manifest"
    if not manifest_dir.exists():
        write_subjects_manifest(manifest_dir)
    m = Manifest.open(manifest_dir)
    ids = c.subjects or [s.subject_id for s in SUBJECTS]
    ec = EvalConfig(images_per_prompt=c.images_per_prompt, class_images=c.class_images,
                    num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale, seed=c.seed)
    scorers = Scorers.from_config(ec, judge=ToyJudge.load())
    cache = ClassImageCache(out / "class-cache")
    base_cfg = microbench_train_config(base_spec, **c.train)
    rows: list[dict] = []
    for sid in ids:
        rec = m.record(sid)
        images = [im for _, im, _ in m.read_images(sid)]
        identifier = None
        for label, prior in (("base", None), ("dreambooth", False), ("dreambooth+prior", True)):
            t0 = time.perf_counter()
            if prior is None:
                pipe = load_base(base_spec, fresh=False).pipeline()
                ident = identifier or "sks"
            else:
                tcfg = replace(base_cfg, with_prior_preservation=prior)
                result = train_subject(
                    SubjectData(subject_id=sid, class_noun=rec.class_noun, images=images), base_spec, tcfg,
                    out / "experts" / label / sid, class_cache=cache, overwrite=True, progress=False,
                )
                ident = identifier = result.info.identifier
                pipe = _trained_pipeline(result, base_spec)
            case = SubjectCase(sid, rec.class_noun, ident, c.prompts or list(rec.eval_prompts), images, label=label)
            row = evaluate_case(pipe, case, scorers, ec, with_identifier=prior is not None,
                                grid_path=out / "grids" / label / f"{sid}.png")
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            log.info("%s %s: %s", sid, label, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    write_table(rows, out, title="Toy microbench: base vs DreamBooth without / with prior preservation")
    (out / "config.json").write_text(__import__("json").dumps(
        {"microbench": asdict(c), "train": asdict(base_cfg), "eval": asdict(ec)}, indent=1, default=str))
    return rows


def _trained_pipeline(result, base_spec: str):
    """The expert as the trainer wrote it, loaded back the way `dreamfleet eval` loads it."""
    from dreamfleet.core.expert import open_expert

    pipe, _ = open_expert(result.expert_dir)
    return pipe


METRICS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel", "class_drift")


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each metric per model label."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == label]
        out[label] = {k: sum(r[k] for r in sel) / len(sel)
                      for k in METRICS if all(k in r for r in sel)}
    return out
