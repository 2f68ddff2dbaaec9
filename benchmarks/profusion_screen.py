"""Screen one ProFusion customisation recipe on held-out toy subjects, cheaper than the full
``dreamfleet profusion compare``: no DreamBooth row, no sweep, a given pre-trained PromptNet.

Each subject is customised from its first photo with the recipe's ``CustomizeConfig`` fields,
then evaluated (fixed seeds, the bench's sampler: Fusion Sampling K = 1, w_f = 4, gamma = 0.6,
w1 = 4) with Fusion Sampling and with K = 0. One JSON line per subject, then the means.

    .venv/bin/python benchmarks/profusion_screen.py --promptnet runs/pf/promptnet --out /tmp/screen \
        --subjects ball-halves,box-quarters,cup-band,kite-cross steps=200 learning_rate=1e-3 qkv_rank=8

(a PromptNet from ``dreamfleet profusion compare --out runs/pf`` or ``profusion pretrain`` on
procedural subjects; ``KEY=VALUE`` pairs are CustomizeConfig fields.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel")


def recipe(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs as CustomizeConfig fields, typed and checked as every config is."""
    from dreamfleet.core.config import from_dict
    from dreamfleet.trainers.profusion import CustomizeConfig

    given = dict(pair.partition("=")[::2] for pair in pairs)
    typed = from_dict(CustomizeConfig, given, where="recipe")
    return {k: getattr(typed, k) for k in given}


def screen_subject(sid: str, args, over: dict, ctx: dict) -> dict:
    from dreamfleet.eval.evaluate import evaluate_case
    from dreamfleet.eval.profusion_bench import (
        Subject,
        WithParams,
        _params,
        _timed_first_image,
        customize_config,
    )
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import customize_subject

    rec, c = ctx["manifest"].record(sid), ctx["bench"]
    photos = [im for _, im, _ in ctx["manifest"].read_images(sid)]
    s = Subject(sid, rec.class_noun, photos, list(rec.eval_prompts))
    _, result = customize_subject(SubjectData(sid, rec.class_noun, photos[:1]), "toy",
                                  customize_config(c, args.promptnet, **over), args.out / sid, overwrite=True,
                                  progress=False)
    pipe, info, _ = _timed_first_image(args.out / sid, s.templates[0], c, _params(c))
    row = evaluate_case(pipe, s.case(info.identifier, "fusion"), ctx["scorers"], ctx["ec"],
                        grid_path=args.out / f"{sid}.png")
    k0 = evaluate_case(WithParams(pipe.pipe, _params(c, refine_step=0)), s.case(info.identifier, "k0"),
                       ctx["scorers"], ctx["ec"])
    return {"subject": sid, "personalise_s": round(info.wall_time_s, 1), **{k: round(row[k], 4) for k in METRICS},
            "k0": {k: round(k0[k], 4) for k in METRICS},
            "s_star_norm": round(result.history[-1].get("s_star_norm", 0.0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--promptnet", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--subjects", default="ball-halves,box-quarters,cup-band,kite-cross")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("recipe", nargs="*", help="CustomizeConfig fields as KEY=VALUE")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.eval.evaluate import Scorers
    from dreamfleet.eval.profusion_bench import ProFusionBenchConfig, _eval_config
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.subjects import write_subjects_manifest

    over = recipe(args.recipe)
    bench = ProFusionBenchConfig(images_per_prompt=args.images_per_prompt)
    ec = _eval_config(bench)
    if not (args.out / "manifest").exists():
        write_subjects_manifest(args.out / "manifest")
    ctx = {"manifest": Manifest.open(args.out / "manifest"), "bench": bench, "ec": ec,
           "scorers": Scorers.from_config(ec, judge=ToyJudge.load())}
    rows = []
    for sid in args.subjects.split(","):
        rows.append(screen_subject(sid, args, over, ctx))
        print(json.dumps(rows[-1]), flush=True)
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in ("personalise_s", *METRICS)}
    print("MEAN", json.dumps({"recipe": over, **mean}), flush=True)


if __name__ == "__main__":
    main()
