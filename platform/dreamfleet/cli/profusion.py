"""`dreamfleet profusion pretrain`: PromptNet for a base model, from a manifest's subjects.

Per-subject customisation is ``dreamfleet train-subject --method profusion --promptnet DIR``
(one photo: the first in --images); experts are sampled with Fusion Sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamfleet.core import config as C


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.control.cluster import EncoderRuntime
    from dreamfleet.trainers.profusion import PromptNetConfig

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
    C.add_arguments(p, PromptNetConfig)
    C.add_arguments(p, EncoderRuntime)
    p.set_defaults(handler=run_pretrain)


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
