"""`dreamfleet toy ...`: the toy world, its pretrained base model, subjects and judge."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dreamfleet.core import config as C

log = logging.getLogger("dreamfleet")


def register(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy", help="the toy world: render, pretrain the toy model, subjects, judge, samples")
    tsub = toy.add_subparsers(dest="toy_command", metavar="TOY_COMMAND", required=True)

    p = tsub.add_parser("pretrain", help="pretrain the toy base model on the toy world (CPU, under an hour)")
    p.add_argument("--out", required=True, type=Path, help="diffusers folder to write (the shipped one: "
                   "platform/dreamfleet/toy/assets/toy-model)")
    p.add_argument("--grid", type=Path, help="also write a sample grid PNG of the pretrained model here")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at --out")
    C.add_arguments_later(p, _pretrain_configs)
    p.set_defaults(handler=run_pretrain)

    p = tsub.add_parser("render", help="render N captioned world images into a folder (NNNNN.png + NNNNN.txt)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("-n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image side in px")
    p.set_defaults(handler=run_render)

    p = tsub.add_parser("subjects", help="write the toy subjects as a manifest")
    p.add_argument("--out", required=True, type=Path, help="manifest folder to write")
    p.add_argument("--images", type=int, default=5, help="images per subject (4-5 as in DreamBench)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=run_subjects)

    p = tsub.add_parser("judge", help="train the toy judge (the classifier behind the toy metrics) and validate it")
    p.add_argument("--out", type=Path, help="folder to write (default: the shipped platform/dreamfleet/toy/assets/toy-judge)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 1800)")
    p.add_argument("--pool-size", type=int, help="renders in the training pool (default 12000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=run_judge)

    p = tsub.add_parser("microbench", help="base vs DreamBooth without / with prior preservation on the toy subjects")
    p.add_argument("--out", required=True, type=Path, help="folder for experts, grids and results.{csv,md}")
    p.add_argument("--subjects", help="comma-separated subject ids (default: all)")
    p.add_argument("--steps", type=int, help="DreamBooth steps (default: the microbench recipe's)")
    p.add_argument("--base-model", default="toy")
    p.set_defaults(handler=run_microbench)

    p = tsub.add_parser("samples", help="a sample grid of a base model, one row per prompt")
    p.add_argument("--base-model", default="toy")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: a fixed set over classes, colours, contexts")
    p.add_argument("--per-prompt", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.set_defaults(handler=run_samples)


def _pretrain_configs() -> list[type]:
    from dreamfleet.toy.pretrain import PretrainConfig

    return [PretrainConfig]


def run_pretrain(args: argparse.Namespace) -> int:
    from dreamfleet.toy.pretrain import PretrainConfig, pretrain, sample_grid

    c = C.from_dict(PretrainConfig, C.overrides_from_args(PretrainConfig, args))
    record = pretrain(c, args.out, overwrite=args.overwrite)
    print(f"{c.model} written to {args.out}: {record['vae_steps']} VAE + {record['unet_steps']} denoiser steps "
          f"in {record['wall_time_s'] / 60:.1f} min")
    if args.grid:
        from dreamfleet.toy.flux import load_toy_flux
        from dreamfleet.toy.model import load_toy
        from dreamfleet.toy.pretrain import SAMPLE_PROMPTS

        load = load_toy_flux if c.model == "toy-flux" else load_toy
        sample_grid(load(args.out), SAMPLE_PROMPTS).save(args.grid)
        print(f"samples: {args.grid}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    from dreamfleet.toy.world import world_sample

    args.out.mkdir(parents=True, exist_ok=True)
    for i in range(args.n):
        img, text, _ = world_sample(args.seed, i, size=args.size)
        img.save(args.out / f"{i:05d}.png")
        (args.out / f"{i:05d}.txt").write_text(text + "\n")
    print(f"{args.n} images in {args.out}")
    return 0


def run_subjects(args: argparse.Namespace) -> int:
    from dreamfleet.toy.subjects import write_subjects_manifest

    report = write_subjects_manifest(args.out, images_per_subject=args.images, overwrite=args.overwrite)
    print(report.format())
    return 0


def run_judge(args: argparse.Namespace) -> int:
    import json

    from dreamfleet.toy.judge import JUDGE_DIR, JudgeConfig, train_judge
    from dreamfleet.toy.metrics import validate_judge

    c = JudgeConfig(seed=args.seed)
    if args.steps:
        c.steps = args.steps
    if args.pool_size:
        c.pool_size = args.pool_size
    info = train_judge(args.out or JUDGE_DIR, c, validate=validate_judge)
    print(json.dumps(info["validation"], indent=1))
    print(f"judge written to {args.out or JUDGE_DIR} ({info['wall_time_s']} s)")
    return 0


def run_microbench(args: argparse.Namespace) -> int:
    import json

    from dreamfleet.eval.microbench import MicrobenchConfig, run_microbench, summarise

    c = MicrobenchConfig(subjects=args.subjects.split(",") if args.subjects else [],
                         train={"steps": args.steps} if args.steps else {})
    rows = run_microbench(args.out, c, base_spec=args.base_model)
    print(json.dumps(summarise(rows), indent=1))
    print(f"results: {args.out / 'results.md'}")
    return 0


def run_samples(args: argparse.Namespace) -> int:
    from dreamfleet.core.models import load_base
    from dreamfleet.toy.pretrain import SAMPLE_PROMPTS, sample_grid

    grid = sample_grid(load_base(args.base_model), args.prompt or SAMPLE_PROMPTS, per_prompt=args.per_prompt,
                       seed=args.seed, guidance_scale=args.guidance_scale)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    print(f"samples: {args.out}")
    return 0


