"""`dreamfleet eval`: experts against their manifest's prompts, as DreamBench does it.

For every expert: ``images_per_prompt`` (4) images for each of its subject's evaluation
prompts, plus images of the plain class prompt ("a ball") for class drift; then the metrics,
a table (CSV and markdown) and one sample grid per subject (rows: prompts). The toy metrics
(:mod:`dreamfleet.toy.metrics`) are used for subjects the toy judge knows; DINO / CLIP-I /
CLIP-T (:mod:`dreamfleet.eval.metrics`) when model folders for them are given.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreamfleet.core.config import cfg
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import open_expert
from dreamfleet.core.identifiers import fill_prompt
from dreamfleet.core.images import image_grid

log = logging.getLogger("dreamfleet")


@dataclass
class EvalConfig:
    """How experts are evaluated."""

    images_per_prompt: int = cfg(4, "images generated per prompt (DreamBench: 4)")
    class_images: int = cfg(8, "images of the plain class prompt, for class drift")
    num_inference_steps: int = cfg(25, "denoising steps")
    guidance_scale: float = cfg(4.0, "classifier-free guidance")
    seed: int = cfg(0, "seed of the generation noise (the same for every expert)")
    dino_model: str | None = cfg(None, "local folder of a DINO ViT (e.g. dino-vits16) for the DINO metric")
    clip_model: str | None = cfg(None, "local folder of a CLIP model (e.g. clip-vit-base-patch32) for CLIP-I/CLIP-T")
    device: str = cfg("cpu", "device for generation and metrics")

    def __post_init__(self) -> None:
        for name in ("images_per_prompt", "class_images", "num_inference_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class SubjectCase:
    """What one evaluation needs: who, with which prompts, against which real photos."""

    subject_id: str
    class_noun: str
    identifier: str
    prompt_templates: list[str]
    real_images: list[Image.Image]
    label: str = "expert"

    def prompts(self, with_identifier: bool = True) -> list[str]:
        token = self.identifier if with_identifier else ""
        return [fill_prompt(t, token, self.class_noun) for t in self.prompt_templates]


def native_resolution(pipe) -> int:
    """The side a pipeline renders by default: what ``BaseModel.pipeline`` recorded, else the UNet's."""
    recorded = getattr(pipe, "native_resolution", None)
    return int(recorded) if recorded else int(pipe.unet.config.sample_size) * pipe.vae_scale_factor


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], n: int, c: EvalConfig) -> list[list[Image.Image]]:
    """``n`` images per prompt; image j of every prompt uses noise seed ``seed + j`` (paired across models)."""
    out = []
    size = native_resolution(pipe)
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(c.seed + j) for j in range(n)]
        out.append(pipe([prompt] * n, height=size, width=size, num_inference_steps=c.num_inference_steps,
                        guidance_scale=c.guidance_scale, generator=gens).images)
    return out


@dataclass
class Scorers:
    """The metrics of a run, each optional and passed in by the caller: a judge for the toy
    metrics (:class:`dreamfleet.toy.judge.ToyJudge`, for the subjects it knows), DINO, CLIP."""

    judge: Any = None
    dino: Any = None
    clip: Any = None

    @classmethod
    def from_config(cls, c: EvalConfig, *, judge: Any = None) -> Scorers:
        """DINO and CLIP from the config's model folders, beside the given judge."""
        dino = clip = None
        if c.dino_model:
            from dreamfleet.eval.metrics import DinoScorer

            dino = DinoScorer(c.dino_model, c.device)
        if c.clip_model:
            from dreamfleet.eval.metrics import ClipScorer

            clip = ClipScorer(c.clip_model, c.device)
        return cls(judge, dino, clip)


@dataclass
class CaseImages:
    """The images of one evaluation: ``images_per_prompt`` per prompt, and the plain class prompt's."""

    prompts: list[str]
    images: list[list[Image.Image]]
    class_images: list[Image.Image]

    @property
    def flat(self) -> list[Image.Image]:
        return [im for row in self.images for im in row]


def generate_case(pipe, case: SubjectCase, c: EvalConfig, *, with_identifier: bool = True) -> CaseImages:
    """The subject's prompts (identifier left out for a base model) and the plain class prompt."""
    prompts = case.prompts(with_identifier)
    images = generate(pipe, prompts, c.images_per_prompt, c)
    class_images = generate(pipe, [f"a {case.class_noun}"], c.class_images, c)[0]
    return CaseImages(prompts, images, class_images)


def score_case(gen: CaseImages, case: SubjectCase, scorers: Scorers, c: EvalConfig) -> dict[str, Any]:
    """The metrics of one subject's generated images; returns a table row."""
    from dreamfleet.toy import metrics as toy

    flat = gen.flat
    row: dict[str, Any] = {"subject": case.subject_id, "model": case.label, "class": case.class_noun,
                           "images": len(flat)}
    judge = scorers.judge
    if judge is not None and case.subject_id in judge.subjects:
        per_prompt = [toy.prompt_fidelity(judge, ims, p) for ims, p in zip(gen.images, gen.prompts, strict=True)]
        row["subject_fidelity"] = toy.subject_fidelity(judge, flat, case.subject_id)
        row["subject_similarity"] = toy.subject_similarity(judge, flat, case.real_images)
        row["prompt_fidelity"] = sum(per_prompt) / len(per_prompt)
        # Recontextualisation proper: the prompts whose context none of the subject's photos shows.
        novel = toy.novel_context_prompts(judge, gen.prompts, case.real_images)
        if novel:
            row["prompt_fidelity_novel"] = sum(per_prompt[i] for i in novel) / len(novel)
        row["class_drift"] = toy.class_drift(judge, gen.class_images, case.subject_id)
    if scorers.dino is not None:
        from dreamfleet.eval.metrics import dino_score

        row["dino"] = dino_score(scorers.dino, flat, case.real_images)
    if scorers.clip is not None:
        from dreamfleet.eval.metrics import clip_i_score, clip_t_score

        row["clip_i"] = clip_i_score(scorers.clip, flat, case.real_images)
        # CLIP-T with the identifier replaced by nothing: CLIP does not know the rare token.
        plain = [p for p in case.prompts(False) for _ in range(c.images_per_prompt)]
        row["clip_t"] = clip_t_score(scorers.clip, flat, plain)
    return row


def save_case_grid(gen: CaseImages, path: Path, c: EvalConfig) -> None:
    """Rows: the prompts, then the class prompt; columns: the noise seeds."""
    rows = [*gen.images, gen.class_images[: c.images_per_prompt]]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([im for r in rows for im in r], rows=len(rows), cols=c.images_per_prompt).save(path)


def evaluate_case(pipe, case: SubjectCase, scorers: Scorers, c: EvalConfig, *, with_identifier: bool = True,
                  grid_path: Path | None = None) -> dict[str, Any]:
    """Generate and score one subject with one pipeline; returns a table row."""
    gen = generate_case(pipe, case, c, with_identifier=with_identifier)
    row = score_case(gen, case, scorers, c)
    if grid_path is not None:
        save_case_grid(gen, grid_path, c)
    return row


METRIC_COLUMNS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel", "class_drift", "dino", "clip_i", "clip_t")


def write_table(rows: list[dict[str, Any]], out: Path, *, title: str = "Evaluation") -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` (per-subject rows and a mean per model)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRIC_COLUMNS if any(m in r for r in rows)]
    cols = ["subject", "model", "class", "images", *metrics]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"# {title}", "", "Mean over subjects:", "", "| model | " + " | ".join(metrics) + " |",
             "| --- |" + " --- |" * len(metrics)]
    for m in models:
        sel = [r for r in rows if r["model"] == m]
        vals = [sum(r[k] for r in sel if k in r) / max(1, sum(k in r for r in sel)) for k in metrics]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines += ["", "Per subject:", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in cols) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return out / "results.csv", out / "results.md"


def evaluate_experts(expert_dirs: Sequence[Path], manifest: str | Path, out: str | Path, c: EvalConfig | None = None,
                     *, scorers: Scorers | None = None, include_base: bool = False,
                     on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate each expert on its manifest subject's prompts with ``scorers`` (default: DINO and
    CLIP as the config names them, no judge); write the table and grids under ``out``."""
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest

    c = c or EvalConfig()
    out = Path(out)
    m = Manifest.open(manifest)
    scorers = scorers or Scorers.from_config(c)
    rows: list[dict[str, Any]] = []
    experts: list[dict[str, Any]] = []
    for expert_dir in expert_dirs:
        pipe, info = open_expert(Path(expert_dir))
        experts.append(_expert_record(Path(expert_dir), info))
        rec = m.record(info.subject_id)
        case = SubjectCase(
            subject_id=info.subject_id, class_noun=info.class_noun, identifier=info.identifier,
            prompt_templates=list(rec.eval_prompts) or ["a {0} {1}"],
            real_images=[im for _, im, _ in m.read_images(info.subject_id)], label=info.method,
        )
        if include_base:
            # The untouched base model (the shared cached instance), prompted without the identifier.
            base_row = evaluate_case(load_base(info.base_model["spec"], fresh=False).pipeline(), _as_base(case),
                                     scorers, c, with_identifier=False)
            rows.append(base_row)
        row = evaluate_case(pipe, case, scorers, c, grid_path=out / "grids" / f"{info.subject_id}.png")
        rows.append(row)
        if on_row:
            on_row(row)
        log.info("evaluated %s: %s", info.subject_id, {k: round(v, 3) for k, v in row.items() if isinstance(v, float)})
    write_table(rows, out)
    write_eval_record(out, c, manifest, experts, rows)
    return rows


EVAL_FILE = "eval.json"


def _expert_record(path: Path, info) -> dict[str, Any]:
    return {"path": str(path), "subject_id": info.subject_id, "method": info.method, "base_model": info.base_model,
            "input_hash": info.input_hash, "code_version": info.code_version, "created_at": info.created_at}


def write_eval_record(out: Path, c: EvalConfig, manifest: str | Path, experts: list[dict], rows: list[dict]) -> Path:
    """``eval.json``: the resolved evaluation config, the manifest, which experts (and their
    provenance) were scored by which code, and every row of the table."""
    from dreamfleet.core.artifacts import write_json
    from dreamfleet.core.config import to_dict
    from dreamfleet.core.version import code_version
    from dreamfleet.registry.store import now

    record = {"config": to_dict(c), "manifest": str(manifest), "code_version": code_version(), "created_at": now(),
              "experts": experts, "rows": rows}
    write_json(out / EVAL_FILE, record)
    return out / EVAL_FILE


def _as_base(case: SubjectCase) -> SubjectCase:
    return SubjectCase(case.subject_id, case.class_noun, case.identifier, case.prompt_templates, case.real_images,
                       label="base")
