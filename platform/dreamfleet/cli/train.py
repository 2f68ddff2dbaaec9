"""`dreamfleet train-subject`: DreamBooth for one subject from a folder of photos."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from dreamfleet.core import config as C

log = logging.getLogger("dreamfleet")


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.trainers.config import TrainConfig

    p = sub.add_parser(
        "train-subject",
        help="fine-tune one subject (DreamBooth) from a folder of 3-5 photos",
        description=(
            "DreamBooth for one subject: fine-tunes the base model on 'a [V] [class noun]' with the "
            "photos in --images, with the class prior-preservation loss, and writes an expert folder "
            "(weights, expert.json, validation images) to --out. Re-running after an interruption "
            "resumes from the last checkpoint. With --method profusion: ProFusion from the first photo "
            "(--promptnet DIR from `dreamfleet profusion pretrain`; no class images)."
        ),
    )
    p.add_argument("--images", required=True, type=Path, help="folder with the subject's photos")
    p.add_argument("--class-noun", required=True, help="the subject's class, e.g. dog, backpack")
    p.add_argument("--subject-id", help="subject id (default: the images folder's name)")
    p.add_argument("--identifier", help="the [V] token (default: a rare single token chosen from the tokenizer)")
    p.add_argument("--base-model", default="tiny-random", help="'tiny-random', a local diffusers folder, or a hub id")
    p.add_argument("--out", required=True, type=Path, help="expert folder to write")
    p.add_argument("--class-cache", type=Path, help="class-image cache folder (default: ~/.cache/dreamfleet/class-images)")
    p.add_argument("--config", type=Path, help="JSON/YAML recipe of training options; flags override it")
    p.add_argument("--skip-bad-images", action="store_true", help="train on the readable photos, skipping bad ones")
    p.add_argument("--overwrite", action="store_true", help="replace an existing expert at --out")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume an interrupted run even though its checkpoint was trained with other options")
    C.add_arguments(p, TrainConfig)
    p.set_defaults(handler=run)


def resolve_train_config(args: argparse.Namespace):
    from dreamfleet.trainers.config import TrainConfig

    data = C.load_recipe(args.config) if getattr(args, "config", None) else {}
    data.update(C.overrides_from_args(TrainConfig, args))
    return C.from_dict(TrainConfig, data)


def _caption(photo: Path) -> str | None:
    """The caption beside a photo (``dog01.jpg`` -> ``dog01.txt``), as kohya and diffusers' scripts read it."""
    sidecar = photo.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() or None if sidecar.is_file() else None


def run(args: argparse.Namespace) -> int:
    from dreamfleet.core.images import load_subject_images
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    cfg = resolve_train_config(args)
    images = load_subject_images(args.images, skip_bad=args.skip_bad_images)
    subject = SubjectData(
        subject_id=args.subject_id or args.images.resolve().name,
        class_noun=args.class_noun,
        images=[im.image for im in images],
        image_names=[im.path.name for im in images],
        identifier=args.identifier,
        source=str(args.images.resolve()),
        captions=[_caption(im.path) for im in images] if cfg.captions else None,
        masks=[im.mask for im in images] if cfg.masked_loss else None,
    )
    result = train_subject(
        subject, args.base_model, cfg, args.out,
        class_cache=ClassImageCache(args.class_cache) if args.class_cache else None,
        overwrite=args.overwrite, allow_config_change=args.allow_config_change,
    )
    info = result.info
    print(f"expert written to {result.expert_dir}")
    print(f"  subject {info.subject_id!r}, prompt {info.instance_prompt!r}, method {info.method}")
    print(f"  {result.loop.final_step} steps in {info.wall_time_s:.1f} s, final loss {info.final_loss:.4f}")
    return 0
