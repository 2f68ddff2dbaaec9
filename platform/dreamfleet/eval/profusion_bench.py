"""ProFusion on the toy world against DreamBooth and the apprentice, on held-out subjects.

One command (``dreamfleet profusion compare``) runs every stage with fixed seeds:

1. **PromptNet pre-training** on procedural toy subjects (:func:`dreamfleet.toy.subjects.procedural_subjects`:
   none is a held-out subject, in either colour order), another photo of the subject as the reference.
2. **Rows**, per held-out subject (the eight named toy subjects, which the toy judge knows):
   the base model; DreamBooth + prior preservation from 5 photos (the microbench recipe);
   the apprentice zero-shot from the same photos (when ``apprentice`` is given); ProFusion from
   the subject's first photo, sampled with Fusion Sampling and with K = 0 (plain composable
   guidance); and ProFusion customised with an L2 penalty on S* (the paper's regularised
   ablation), sampled with K = 0.
3. **Columns**: the toy metrics (subject fidelity and similarity, prompt fidelity, prompt
   fidelity on novel contexts), the wall time to personalise and the time to the first image.
4. **Sweep** of w1, w2 and γ around the fusion setting (one factor at a time), identity against
   prompt fidelity, on the held-out subjects' ProFusion experts.

This is evaluation code (it drives the trainers); the trainers know nothing of the toy world.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamfleet.core.fusion import FusionParams
from dreamfleet.eval.evaluate import EvalConfig, Scorers, SubjectCase, evaluate_case, write_table

log = logging.getLogger("dreamfleet")


@dataclass
class ProFusionBenchConfig:
    subjects: list[str] = field(default_factory=list)  # held-out toy subjects (default: all eight)
    train_subjects: int = 64  # procedural subjects PromptNet is pre-trained on
    pretrain_steps: int = 3000
    pretrain_lr: float = 1e-4
    pretrain_batch: int = 8
    customize_steps: int = 200
    customize_lr: float = 1e-3
    customize_batch: int = 4
    views: int = 15
    qkv_rank: int = 8
    s_star_l2: float = 0.1  # the regularised ablation's L2 weight on S*
    dreambooth: dict[str, Any] = field(default_factory=dict)  # overrides of the microbench recipe
    apprentice: str | None = None  # an apprentice folder for the zero-shot row
    fusion: dict[str, Any] = field(default_factory=lambda: {"refine_step": 1, "guidance_scale_ref": 0.0,
                                                            "refine_guidance_scale": 4.0, "refine_emb_scale": 0.6})
    sweep: dict[str, list[float]] = field(default_factory=lambda: {"guidance_scale": [2.0, 6.0],
                                                                   "guidance_scale_ref": [2.0, 4.0],
                                                                   "refine_emb_scale": [0.4, 0.8]})
    images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 4.0  # w1 (and the other rows' classifier-free guidance)
    seed: int = 0


class WithParams:
    """A FusionPipeline called with fixed Fusion Sampling parameters (what evaluation calls)."""

    def __init__(self, pipe, params: FusionParams):
        self.pipe, self.params = pipe, params
        self.native_resolution = pipe.native_resolution

    def __call__(self, prompts, **kw):
        kw.pop("guidance_scale", None)  # w1 is in the params
        return self.pipe(prompts, params=self.params, **kw)


def _eval_config(c: ProFusionBenchConfig) -> EvalConfig:
    return EvalConfig(images_per_prompt=c.images_per_prompt, num_inference_steps=c.num_inference_steps,
                      guidance_scale=c.guidance_scale, seed=c.seed)


def _params(c: ProFusionBenchConfig, **overrides) -> FusionParams:
    return FusionParams(**{"num_inference_steps": c.num_inference_steps, "guidance_scale": c.guidance_scale,
                           **c.fusion, **overrides})


def pretrain_stage(out: Path, c: ProFusionBenchConfig) -> Path:
    """PromptNet pre-trained on procedural subjects (kept: a second run reuses it)."""
    from dreamfleet.core.profusion import PROMPTNET_FILE
    from dreamfleet.toy.subjects import procedural_subjects, write_subjects_manifest
    from dreamfleet.trainers.profusion import PromptNetConfig, pretrain_promptnet

    folder = out / "promptnet"
    if (folder / PROMPTNET_FILE).is_file():
        return folder
    manifest = out / "pretrain-manifest"
    if not manifest.exists():
        write_subjects_manifest(manifest, subjects=procedural_subjects(c.train_subjects, seed=c.seed + 7))
    pc = PromptNetConfig(steps=c.pretrain_steps, learning_rate=c.pretrain_lr, batch_size=c.pretrain_batch,
                         checkpoint_every=max(1, c.pretrain_steps // 4), seed=c.seed, device="cpu")
    pretrain_promptnet(manifest, "toy", pc, folder, progress=False)
    return folder


def customize_config(c: ProFusionBenchConfig, promptnet: Path, **overrides):
    from dreamfleet.trainers.profusion import CustomizeConfig

    return CustomizeConfig(**{"steps": c.customize_steps, "learning_rate": c.customize_lr,
                              "batch_size": c.customize_batch, "views": c.views, "qkv_rank": c.qkv_rank,
                              "checkpoint_every": 0, "promptnet": str(promptnet), "seed": c.seed, "device": "cpu",
                              **overrides})


def _timed_first_image(expert_dir: Path, prompt_template: str, c: ProFusionBenchConfig, params=None) -> tuple:
    """(pipeline, info, seconds to load the expert and render one image)."""
    import torch

    from dreamfleet.core.expert import open_expert

    t0 = time.perf_counter()
    pipe, info = open_expert(expert_dir)
    pipe = WithParams(pipe, params) if params is not None else pipe
    pipe([" ".join(prompt_template.format(info.identifier, info.class_noun).split())],
         num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
         generator=[torch.Generator().manual_seed(c.seed)])
    return pipe, info, time.perf_counter() - t0


@dataclass
class Subject:
    """One held-out subject and what every row of it shares."""

    subject_id: str
    class_noun: str
    photos: list
    templates: list[str]

    def case(self, identifier: str, label: str) -> SubjectCase:
        return SubjectCase(self.subject_id, self.class_noun, identifier, self.templates, self.photos, label=label)


def _row(pipe, case: SubjectCase, ctx: dict, *, personalise_s: float, first_image_s: float,
         with_identifier: bool = True) -> dict[str, Any]:
    grid = ctx["out"] / "grids" / case.label.split(" ")[0].lower() / f"{case.subject_id}-{len(ctx['rows'])}.png"
    row = evaluate_case(pipe, case, ctx["scorers"], ctx["ec"], with_identifier=with_identifier, grid_path=grid)
    row.update(personalise_s=round(personalise_s, 1), first_image_s=round(first_image_s, 1))
    ctx["rows"].append(row)
    log.info("%s %s: %s", case.subject_id, case.label,
             {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    return row


def dreambooth_rows(s: Subject, ctx: dict, c: ProFusionBenchConfig) -> None:
    """DreamBooth + prior from 5 photos, sampled as usual and with Fusion Sampling."""
    from dreamfleet.core.fusion import FusionPipeline
    from dreamfleet.eval.microbench import microbench_train_config
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    result = train_subject(SubjectData(s.subject_id, s.class_noun, s.photos), "toy",
                           microbench_train_config(**c.dreambooth), ctx["out"] / "experts" / "dreambooth" / s.subject_id,
                           class_cache=ctx["class_cache"], overwrite=True, progress=False)
    pipe, info, first = _timed_first_image(result.expert_dir, s.templates[0], c)
    wall = result.info.wall_time_s
    _row(pipe, s.case(info.identifier, "DreamBooth+prior (5 photos)"), ctx, personalise_s=wall,
         first_image_s=wall + first)
    fused = WithParams(FusionPipeline(pipe, identifier=info.identifier, class_noun=s.class_noun), _params(c))
    _row(fused, s.case(info.identifier, "DreamBooth+prior, Fusion Sampling"), ctx, personalise_s=wall,
         first_image_s=wall + first)


def apprentice_row(s: Subject, ctx: dict, c: ProFusionBenchConfig) -> None:
    from dreamfleet.core.apprentice import Apprentice

    t0 = time.perf_counter()
    app = Apprentice.load(c.apprentice)
    pipe = app.bind(s.photos)
    pipe([" ".join(s.templates[0].format(app.identifier, s.class_noun).split())],
         num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale)
    _row(pipe, s.case(app.identifier, "apprentice (zero-shot, 5 photos)"), ctx, personalise_s=0.0,
         first_image_s=time.perf_counter() - t0)


def profusion_rows(s: Subject, ctx: dict, c: ProFusionBenchConfig) -> Path:
    """ProFusion from the first photo: Fusion Sampling, K = 0, and the L2-regularised ablation."""
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import customize_subject

    one = SubjectData(s.subject_id, s.class_noun, s.photos[:1])
    expert = ctx["out"] / "experts" / "profusion" / s.subject_id
    info, _ = customize_subject(one, "toy", customize_config(c, ctx["promptnet"]), expert, overwrite=True,
                                progress=False)
    pipe, info, first = _timed_first_image(expert, s.templates[0], c, _params(c))
    wall = info.wall_time_s
    _row(pipe, s.case(info.identifier, "ProFusion (1 photo, Fusion Sampling)"), ctx, personalise_s=wall,
         first_image_s=wall + first)
    _row(WithParams(pipe.pipe, _params(c, refine_step=0)), s.case(info.identifier, "ProFusion K=0"), ctx,
         personalise_s=wall, first_image_s=wall + first)
    reg = ctx["out"] / "experts" / "profusion-l2" / s.subject_id
    info2, _ = customize_subject(one, "toy", customize_config(c, ctx["promptnet"], s_star_l2=c.s_star_l2), reg,
                                 overwrite=True, progress=False)
    pipe2, info2, first2 = _timed_first_image(reg, s.templates[0], c, _params(c, refine_step=0))
    _row(pipe2, s.case(info2.identifier, "ProFusion + L2 on S* (K=0)"), ctx, personalise_s=info2.wall_time_s,
         first_image_s=info2.wall_time_s + first2)
    return expert


def sweep_rows(s: Subject, expert: Path, ctx: dict, c: ProFusionBenchConfig) -> None:
    """One factor of (w1, w2, γ) at a time around the fusion setting, on the subject's ProFusion expert."""
    from dreamfleet.core.expert import open_expert

    pipe, info = open_expert(expert)
    for name, values in c.sweep.items():
        for v in values:
            label = f"sweep {name}={v:g}"
            _row(WithParams(pipe, _params(c, **{name: v})), s.case(info.identifier, label), ctx,
                 personalise_s=info.wall_time_s, first_image_s=0.0)


def base_row(s: Subject, ctx: dict) -> None:
    from dreamfleet.core.models import load_base

    _row(load_base("toy", fresh=False).pipeline(), s.case("", "base"), ctx, personalise_s=0.0, first_image_s=0.0,
         with_identifier=False)


def run_profusion_bench(out: str | Path, c: ProFusionBenchConfig | None = None) -> dict[str, Any]:
    """Every stage; writes results.csv/.md, summary.json and sweep.png under ``out``."""
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.subjects import SUBJECTS, write_subjects_manifest
    from dreamfleet.trainers.class_images import ClassImageCache

    c = c or ProFusionBenchConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    promptnet = pretrain_stage(out, c)
    if not (out / "manifest").exists():
        write_subjects_manifest(out / "manifest")
    m = Manifest.open(out / "manifest")
    ec = _eval_config(c)
    ctx = {"out": out, "rows": [], "scorers": Scorers.from_config(ec, judge=ToyJudge.load()), "ec": ec,
           "promptnet": promptnet, "class_cache": ClassImageCache(out / "class-cache")}
    for sid in c.subjects or [s.subject_id for s in SUBJECTS]:
        rec = m.record(sid)
        s = Subject(sid, rec.class_noun, [im for _, im, _ in m.read_images(sid)], list(rec.eval_prompts))
        base_row(s, ctx)
        dreambooth_rows(s, ctx, c)
        if c.apprentice:
            apprentice_row(s, ctx, c)
        expert = profusion_rows(s, ctx, c)
        sweep_rows(s, expert, ctx, c)
    rows = ctx["rows"]
    write_table(rows, out, title="ProFusion on the toy world: held-out subjects")
    summary = {"labels": summarise(rows), "targets": targets(summarise(rows)), "config": dataclasses.asdict(c),
               "promptnet": json.loads((promptnet / "promptnet.json").read_text())["train_stats"],
               "wall_s": round(time.perf_counter() - t0, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    sweep_plot(summary["labels"]).save(out / "sweep.png")
    return summary


COLUMNS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel", "personalise_s",
           "first_image_s")


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean of each column per row label, over the subjects."""
    out: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(r["model"] for r in rows):
        sel = [r for r in rows if r["model"] == label]
        out[label] = {k: round(sum(r[k] for r in sel if k in r) / max(1, sum(k in r for r in sel)), 4)
                      for k in COLUMNS if any(k in r for r in sel)}
        out[label]["subjects"] = len(sel)
    return out


def targets(labels: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The issue's three targets, each with the numbers it compares."""
    base, db = labels.get("base", {}), labels.get("DreamBooth+prior (5 photos)", {})
    pf, k0 = labels.get("ProFusion (1 photo, Fusion Sampling)", {}), labels.get("ProFusion K=0", {})
    if not (base and db and pf and k0):
        return {}
    return {
        "similarity_vs_dreambooth": [pf["subject_similarity"], db["subject_similarity"],
                                     pf["subject_similarity"] >= db["subject_similarity"]],
        "prompt_fidelity_vs_base": [pf["prompt_fidelity"], round(0.85 * base["prompt_fidelity"], 4),
                                    pf["prompt_fidelity"] >= 0.85 * base["prompt_fidelity"]],
        "time_ratio_vs_dreambooth": [pf["personalise_s"], db["personalise_s"],
                                     pf["personalise_s"] <= db["personalise_s"] / 10],
        "fusion_vs_k0": [[pf["subject_fidelity"], pf["prompt_fidelity"]], [k0["subject_fidelity"], k0["prompt_fidelity"]],
                         pf["subject_fidelity"] > k0["subject_fidelity"] and pf["prompt_fidelity"] >= k0["prompt_fidelity"]],
    }


def sweep_plot(labels: dict[str, dict[str, float]], side: int = 360):
    """Identity (subject fidelity, y) against prompt fidelity (x) of every ProFusion setting."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side + 60, side + 40), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((40, 10, 40 + side, 10 + side), outline="black")
    d.text((44, side + 16), "prompt fidelity 0..1 ->", fill="black")
    d.text((2, 12), "subj", fill="black")
    points = {k: v for k, v in labels.items() if k.startswith(("ProFusion", "sweep"))}
    for label, v in points.items():
        x = 40 + v.get("prompt_fidelity", 0.0) * side
        y = 10 + (1 - v.get("subject_fidelity", 0.0)) * side
        colour = "red" if label.startswith("ProFusion (") else "blue" if label.startswith("sweep") else "green"
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.text((x + 5, y - 5), label.replace("sweep ", "").replace("ProFusion ", "PF "), fill=colour)
    return img
