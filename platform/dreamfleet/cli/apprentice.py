"""`dreamfleet apprentice gather|train` and `dreamfleet generate` (zero-shot from demonstrations, or an expert)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dreamfleet.core import config as C

log = logging.getLogger("dreamfleet")


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.control.gather import GatherConfig

    ap = sub.add_parser("apprentice", help="SuTI-style apprentice: gather experts' outputs, train the apprentice")
    asub = ap.add_subparsers(dest="apprentice_command", metavar="APPRENTICE_COMMAND", required=True)

    p = asub.add_parser(
        "gather", help="render with every expert and the base model, keep the renders that gained fidelity",
        description="A Ray Data job: for each expert of REGISTRY and each template, K renders by the expert and K by "
                    "the base model (same prompt and seeds), scored against the subject's photos; renders whose "
                    "fidelity gain reaches --threshold are written with the photos as a demonstration set "
                    "(WebDataset shards + Parquet index), every pair's scores to triples.parquet.")
    p.add_argument("registry", help="registry folder or URI with the experts")
    p.add_argument("--out", required=True, type=Path, help="demonstration set folder to write")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--overwrite", action="store_true")
    C.add_arguments(p, GatherConfig)
    p.set_defaults(handler=run_gather)

    p = asub.add_parser("train", help="train the apprentice on a demonstration set (Ray Train; --local without Ray)")
    p.add_argument("demo_set", help="demonstration set written by `dreamfleet apprentice gather`")
    p.add_argument("--out", required=True, type=Path, help="apprentice folder to write")
    p.add_argument("--base-model", default="toy", help="the base model the experts were trained on")
    p.add_argument("--overwrite", action="store_true")
    C.add_arguments_later(p, _train_configs)
    p.set_defaults(handler=run_train)

    g = sub.add_parser(
        "generate", help="generate images: zero-shot from --demos with an apprentice, or with a subject's expert",
        description="With --demos: the apprentice personalises from 1-8 photos, no fine-tuning ('[V]' in the prompt "
                    "stands for the subject). With --subject: the subject's expert from --registry.")
    g.add_argument("--prompt", required=True, help="e.g. 'a [V] ball in the snow'")
    g.add_argument("--demos", nargs="+", type=Path, help="photos of the subject (zero-shot)")
    g.add_argument("--apprentice", type=Path, help="apprentice folder (with --demos)")
    g.add_argument("--class-noun", help="with --demos: the subject's class, for '{subject}' in the prompt")
    g.add_argument("--subject", help="a subject with an expert in --registry (instead of --demos)")
    g.add_argument("--registry", help="registry of the experts (with --subject)")
    g.add_argument("--out", type=Path, default=Path("generated"), help="folder for the PNGs")
    g.add_argument("-n", "--num-images", type=int, default=4)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance-scale", type=float, default=4.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(handler=run_generate)


def _train_configs() -> list[type]:
    from dreamfleet.control.apprentice import ApprenticeRuntime
    from dreamfleet.trainers.apprentice import ApprenticeConfig

    return [ApprenticeConfig, ApprenticeRuntime]


def run_gather(args: argparse.Namespace) -> int:
    from dreamfleet.control.gather import GatherConfig, gather

    c = C.from_dict(GatherConfig, C.overrides_from_args(GatherConfig, args))
    report = gather(args.registry, args.out, c, address=args.address, overwrite=args.overwrite)
    print(report.format())
    print("kept at other thresholds (gain >= t): " + ", ".join(f"{t}: {n}" for t, n in report.kept_at.items()))
    return 0


def run_train(args: argparse.Namespace) -> int:
    from dreamfleet.control.apprentice import ApprenticeRuntime, train
    from dreamfleet.trainers.apprentice import ApprenticeConfig

    c = C.from_dict(ApprenticeConfig, C.overrides_from_args(ApprenticeConfig, args))
    rt = C.from_dict(ApprenticeRuntime, C.overrides_from_args(ApprenticeRuntime, args))
    info = train(args.demo_set, args.base_model, c, args.out, rt, overwrite=args.overwrite)
    print(f"apprentice: {args.out} (identifier {info.identifier!r}: write '[V]' in prompts; final loss "
          f"{info.final_loss:.4f}, {info.train_stats.get('steps')} steps, {info.wall_time_s:.0f} s)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import time

    import torch

    from dreamfleet.core.devices import resolve_device
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.core.images import image_grid, open_image

    if (args.demos is None) == (args.subject is None):
        raise ConfigError("give either --demos (zero-shot, with --apprentice) or --subject (with --registry)")
    if not 1 <= args.num_images <= 64:
        raise ConfigError("--num-images must be in 1..64")
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    gens = [torch.Generator("cpu").manual_seed(args.seed + j) for j in range(args.num_images)]
    if args.demos is not None:
        from dreamfleet.core.apprentice import Apprentice, check_demonstrations, fill_prompt

        if args.apprentice is None:
            raise ConfigError("--demos needs --apprentice DIR (train one with `dreamfleet apprentice train`)")
        demos = [open_image(p) for p in args.demos]
        check_demonstrations(demos, where="--demos")
        app = Apprentice.load(args.apprentice, device=device)
        prompt = fill_prompt(args.prompt, app.identifier, args.class_noun)
        images = app.generate(demos, [prompt] * args.num_images, steps=args.steps,
                              guidance_scale=args.guidance_scale, generators=gens)
    else:
        from dreamfleet.core.expert import open_expert
        from dreamfleet.registry import Registry

        if not args.registry:
            raise ConfigError("--subject needs --registry")
        pipe, info = open_expert(Registry(args.registry, create=False).fetch(args.subject))
        pipe.to(device)
        prompt = info.prompt(args.prompt)
        images = pipe([prompt] * args.num_images, num_inference_steps=args.steps,
                      guidance_scale=args.guidance_scale, generator=gens).images
    args.out.mkdir(parents=True, exist_ok=True)
    for j, im in enumerate(images):
        im.save(args.out / f"{args.seed + j:06d}.png")
    image_grid(images, rows=1, cols=len(images)).save(args.out / "grid.png")
    print(f"{len(images)} image(s) of {prompt!r} in {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0
