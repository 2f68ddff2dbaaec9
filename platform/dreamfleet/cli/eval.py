"""`dreamfleet eval`: evaluate experts on their manifest's prompts (DreamBench protocol)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamfleet.core import config as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate experts: 4 images per prompt, metrics table (CSV, markdown) and a grid per subject",
        description=(
            "Generates images_per_prompt images for every evaluation prompt of each expert's subject (from the "
            "manifest) and for its plain class prompt, then scores them: the toy metrics (subject fidelity, "
            "prompt fidelity, class drift) for toy subjects, DINO / CLIP-I / CLIP-T when --dino-model / "
            "--clip-model give local model folders. Writes results.csv, results.md, grids/SUBJECT.png and eval.json "
            "(the resolved config, the manifest, each expert's provenance, every row)."
        ),
    )
    p.add_argument("experts", nargs="+", type=Path, help="expert folders (or folders of expert folders)")
    p.add_argument("--manifest", required=True, help="the manifest the experts were trained from")
    p.add_argument("--out", required=True, type=Path, help="folder for the table and grids")
    p.add_argument("--include-base", action="store_true", help="also evaluate the untouched base model per subject")
    C.add_arguments_later(p, _configs)
    p.set_defaults(handler=run)


def _configs() -> list[type]:
    from dreamfleet.eval.evaluate import EvalConfig

    return [EvalConfig]


def expert_folders(paths: list[Path]) -> list[Path]:
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.core.expert import EXPERT_FILE

    found = []
    for path in paths:
        if (path / EXPERT_FILE).is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p.parent for p in path.glob(f"*/{EXPERT_FILE}"))
    if not found:
        raise ConfigError(f"no expert folders (with {EXPERT_FILE}) in {', '.join(map(str, paths))}")
    return found


def run(args: argparse.Namespace) -> int:
    from dreamfleet.eval.evaluate import EvalConfig, Scorers, evaluate_experts
    from dreamfleet.toy.judge import ToyJudge

    c = C.from_dict(EvalConfig, C.overrides_from_args(EvalConfig, args))
    scorers = Scorers.from_config(c, judge=ToyJudge.load())  # the toy metrics for toy subjects
    evaluate_experts(expert_folders(args.experts), args.manifest, args.out, c, scorers=scorers,
                     include_base=args.include_base)
    print(f"results: {args.out / 'results.md'} (and results.csv, eval.json, grids/)")
    return 0
