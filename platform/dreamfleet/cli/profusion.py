"""`dreamfleet profusion pretrain`: PromptNet for a base model, from a manifest's subjects.

Per-subject customisation is ``dreamfleet train-subject --method profusion --promptnet DIR``
(one photo: the first in --images); experts are sampled with Fusion Sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamfleet.core import config as C

# ProFusionBenchConfig fields that `compare` takes as flags of the same name (--customize-lr, ...)
COMPARE_FIELDS = (("train_subjects", int), ("pretrain_steps", int), ("customize_steps", int), ("customize_lr", float),
                  ("qkv_rank", int), ("views", int), ("images_per_prompt", int), ("num_inference_steps", int),
                  ("s_star_l2", float))


def register(sub: argparse._SubParsersAction) -> None:
    ap = sub.add_parser("profusion", help="ProFusion: pre-train PromptNet (customise with train-subject --method profusion)")
    asub = ap.add_subparsers(dest="profusion_command", metavar="PROFUSION_COMMAND", required=True)
    p = asub.add_parser(
        "pretrain", help="pre-train PromptNet on a manifest's subjects (once per base model)",
        description="Trains ProFusion's encoder on every readable subject of MANIFEST, on Ray Train (--workers, "
                    "--zero-stage) or in this process (--local): the target is one photo, the "
                    "reference another photo of the same subject (--reference other) or itself (same). Only "
                    "PromptNet trains. Re-running after an interruption resumes from the last checkpoint; a "
                    "subject whose shards are unreadable is skipped and named in promptnet.json.")
    p.add_argument("manifest", help="manifest folder or URI")
    p.add_argument("--out", required=True, type=Path, help="PromptNet folder to write")
    p.add_argument("--base-model", default="toy", help="'toy', 'tiny-random', a local diffusers folder, or a hub id")
    p.add_argument("--subjects", help="comma-separated subject ids (default: all)")
    p.add_argument("--overwrite", action="store_true")
    C.add_arguments_later(p, _pretrain_configs)
    p.set_defaults(handler=run_pretrain)

    q = asub.add_parser(
        "compare", help="the toy-world comparison: ProFusion vs DreamBooth (+ the apprentice) on held-out subjects",
        description="Pre-trains PromptNet on procedural toy subjects, then for each held-out toy subject evaluates "
                    "the base model, DreamBooth + prior (5 photos), the apprentice (with --apprentice), ProFusion "
                    "from one photo with Fusion Sampling and with K=0, and the L2-regularised ablation, plus a "
                    "sweep of w1, w2 and gamma. Writes results.md/csv, summary.json and sweep.png to --out; a "
                    "second run reuses the pre-trained PromptNet in --out.")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--subjects", help="comma-separated held-out toy subjects (default: all eight)")
    q.add_argument("--apprentice", help="an apprentice folder for the zero-shot row")
    for name, kind in COMPARE_FIELDS:
        q.add_argument("--" + name.replace("_", "-"), type=kind, help=f"(default: the bench's {name})")
    q.add_argument("--dreambooth-steps", type=int, help="DreamBooth steps (default: the microbench recipe's 1200)")
    q.set_defaults(handler=run_compare)


def _pretrain_configs() -> list[type]:
    from dreamfleet.control.cluster import EncoderRuntime
    from dreamfleet.trainers.profusion import PromptNetConfig

    return [PromptNetConfig, EncoderRuntime]


def run_compare(args: argparse.Namespace) -> int:
    import json

    from dreamfleet.eval.profusion_bench import ProFusionBenchConfig, run_profusion_bench

    fields = [name for name, _ in COMPARE_FIELDS] + ["apprentice"]
    c = ProFusionBenchConfig(**{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    if args.subjects:
        c.subjects = args.subjects.split(",")
    if args.dreambooth_steps:
        c.dreambooth = {"steps": args.dreambooth_steps}
    summary = run_profusion_bench(args.out, c)
    print(f"results: {args.out / 'results.md'}; sweep: {args.out / 'sweep.png'}; {summary['wall_s']:.0f} s")
    print(json.dumps(summary["targets"], indent=1))
    return 0


def run_pretrain(args: argparse.Namespace) -> int:
    from dreamfleet.control.cluster import EncoderRuntime
    from dreamfleet.control.profusion import pretrain
    from dreamfleet.trainers.profusion import PromptNetConfig

    c = C.from_dict(PromptNetConfig, C.overrides_from_args(PromptNetConfig, args))
    rt = C.from_dict(EncoderRuntime, C.overrides_from_args(EncoderRuntime, args))
    subjects = [s for s in (args.subjects or "").split(",") if s] or None
    info = pretrain(args.manifest, args.base_model, c, args.out, rt, subjects=subjects, overwrite=args.overwrite)
    print(f"PromptNet written to {args.out}")
    print(f"  {info.dataset['subjects']} subjects, {info.dataset['images']} photos, placeholder "
          f"{info.placeholder_token!r}, {info.train_stats['steps']} steps in {info.wall_time_s:.1f} s, "
          f"final loss {info.final_loss:.4f}")
    for sid, why in info.dataset["skipped"].items():
        print(f"  skipped {sid}: {why}")
    return 0
