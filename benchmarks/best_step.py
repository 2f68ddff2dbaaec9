"""Best step per subject against the microbench's fixed step count, on the 8 toy subjects.

Both train DreamBooth with prior preservation from the shipped toy model with the microbench
recipe (full UNet, AdamW 3e-5, 50 class images; ``microbench_train_config``):

- ``fixed``: 1200 steps, the last published (the microbench's recipe);
- ``selected``: up to ``--max-steps`` (2400), scored every ``--every`` (200) steps by the toy
  judge (2 images per prompt of the subject's 6 prompts), the best step published under the
  rule (highest subject similarity with prompt fidelity >= 0.85 of the base's), training
  stopped after ``--patience`` (3) evaluations without improvement.

Each published expert (and the base model) is then evaluated exactly as the microbench does
(4 images per prompt, 8 class images, 25 steps, guidance 4) by ``evaluate_case``. Compute is
counted in training steps: steps trained, plus the evaluation's time divided by the same run's
median time per training step (so that the table holds on any machine)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/best_step.py --out runs/best-step --labels fixed
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/best_step.py --out runs/best-step --labels selected
    .venv/bin/python benchmarks/best_step.py --out runs/best-step --report   # the table of docs/microbench.md
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("dreamfleet")
METRICS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel", "class_drift")


def train_config(label: str, a: argparse.Namespace):
    from dreamfleet.eval.microbench import microbench_train_config

    cfg = microbench_train_config(with_prior_preservation=True, steps=a.fixed_steps)
    if label.startswith("selected"):
        cfg = replace(cfg, steps=a.max_steps, select_every=a.every, select_scorer="toy", select_patience=a.patience,
                      select_images=a.images, select_inference_steps=25, select_guidance_scale=4.0)
    return cfg


def run_label(label: str, a: argparse.Namespace) -> None:
    from dreamfleet.core.expert import open_expert
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.eval.evaluate import EvalConfig, Scorers, SubjectCase, evaluate_case
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.subjects import SUBJECTS, write_subjects_manifest
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    out = Path(a.out)
    if not (out / "manifest").exists():
        write_subjects_manifest(out / "manifest")
    m = Manifest.open(out / "manifest")
    ec = EvalConfig(images_per_prompt=4, class_images=8, num_inference_steps=25, guidance_scale=4.0, seed=0)
    scorers = Scorers.from_config(ec, judge=ToyJudge.load())
    cfg = train_config(label, a)
    rows_path = out / f"{label}.jsonl"
    done = {json.loads(line)["subject"] for line in rows_path.open()} if rows_path.exists() else set()
    for sid in [s.subject_id for s in SUBJECTS if not a.subjects or s.subject_id in a.subjects.split(",")]:
        if sid in done:
            continue
        rec = m.record(sid)
        images = [im for _, im, _ in m.read_images(sid)]
        t0 = time.perf_counter()
        if label == "base":
            pipe, info, row_extra = load_base("toy", fresh=False).pipeline(), None, {}
        else:
            r = train_subject(SubjectData(sid, rec.class_noun, images, prompts=list(rec.eval_prompts)), "toy", cfg,
                              out / "experts" / label / sid, class_cache=ClassImageCache(out / f"class-cache-{label}"),
                              overwrite=True, progress=False)
            pipe, info = open_expert(r.expert_dir)[0], r.info
            row_extra = compute(r)
        case = SubjectCase(sid, rec.class_noun, info.identifier if info else "sks", list(rec.eval_prompts), images,
                           label=label)
        row = evaluate_case(pipe, case, scorers, ec, with_identifier=info is not None,
                            grid_path=out / "grids" / label / f"{sid}.png")
        row.update(row_extra, seconds=round(time.perf_counter() - t0, 1))
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.warning("%s %s: %s", label, sid, {k: v for k, v in row.items() if isinstance(v, (int, float))})


def compute(r) -> dict:
    """Steps trained, the chosen step, and the evaluation's cost in training steps of this run."""
    steps = [h["step"] for h in r.loop.history]
    per_step = r.loop.step_time_s / max(1, len(steps))
    sel = r.info.selection or {}
    eval_s = sel.get("eval_seconds", 0.0)
    return {"steps_trained": r.loop.final_step, "chosen_step": sel.get("chosen_step", r.loop.final_step),
            "step_s": round(per_step, 4), "eval_s": round(eval_s, 1), "eval_steps": round(eval_s / per_step),
            "fallback": sel.get("fallback", False)}


def report(out: Path) -> str:
    rows = {label: [json.loads(x) for x in (out / f"{label}.jsonl").open()]
            for label in ("base", "fixed", "selected", *(p.stem for p in sorted(out.glob("selected-*.jsonl"))))
            if (out / f"{label}.jsonl").exists()}
    base = {r["subject"]: r for r in rows.get("base", [])}
    lines = ["| recipe | subject fidelity ↑ | subject similarity ↑ | prompt fidelity (÷ base) | novel contexts (÷ base) "
             "| class drift ↓ | steps trained | + evaluation | = step-equivalents |", "| --- " * 9 + "|"]
    for label, rs in rows.items():
        mean = {k: statistics.fmean(r[k] for r in rs) for k in METRICS}
        ratio = {k: statistics.fmean(r[k] / base[r["subject"]][k] for r in rs) if base else float("nan")
                 for k in ("prompt_fidelity", "prompt_fidelity_novel")}
        trained = statistics.fmean(r.get("steps_trained", 0) for r in rs)
        ev = statistics.fmean(r.get("eval_steps", 0) for r in rs)
        lines.append(f"| {label} | {mean['subject_fidelity']:.3f} | {mean['subject_similarity']:.3f} | "
                     f"{mean['prompt_fidelity']:.3f} ({ratio['prompt_fidelity']:.2f}) | "
                     f"{mean['prompt_fidelity_novel']:.3f} ({ratio['prompt_fidelity_novel']:.2f}) | "
                     f"{mean['class_drift']:.3f} | {trained:.0f} | {ev:.0f} | {trained + ev:.0f} |")
    lines += ["", "| subject | recipe | chosen / trained | subject fidelity | subject similarity | prompt fidelity "
              "| class drift |", "| --- " * 7 + "|"]
    for sid in base or {r["subject"] for rs in rows.values() for r in rs}:
        for label in [x for x in rows if x != "base"]:
            r = next((x for x in rows.get(label, []) if x["subject"] == sid), None)
            if r:
                lines.append(f"| {sid} | {label} | {r['chosen_step']} / {r['steps_trained']}"
                             f"{' (fallback)' if r.get('fallback') else ''} | {r['subject_fidelity']:.3f} | "
                             f"{r['subject_similarity']:.3f} | {r['prompt_fidelity']:.3f} | {r['class_drift']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/best-step"))
    ap.add_argument("--labels", default="base,fixed,selected",
                    help="base, fixed, selected or selected-<name> (comma-separated)")
    ap.add_argument("--subjects", default="", help="toy subject ids (default: all 8)")
    ap.add_argument("--fixed-steps", type=int, default=1200)
    ap.add_argument("--max-steps", type=int, default=2400)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--images", type=int, default=2, help="images per prompt at each selection evaluation")
    ap.add_argument("--report", action="store_true", help="print the table of the finished runs")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    if a.report:
        print(report(a.out))
        return
    a.out.mkdir(parents=True, exist_ok=True)
    for label in a.labels.split(","):
        run_label(label, a)


if __name__ == "__main__":
    main()
