"""`dreamfleet demo`: the platform's main job end to end on the embedded default.

An embedded local Ray runs one DreamBooth fine-tune of one subject on the default base
model (the toy model, pretrained on the procedural toy world and shipped in the
repository), then the demo writes an image grid: the training photos above the expert's
generations in new contexts, and the base model's for the same prompts.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("dreamfleet")

DEMO_PROMPTS = ["a {identifier} {class_noun} on the grass", "a {identifier} {class_noun} on the beach",
                "a {identifier} {class_noun} on a rug"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train one subject on an embedded local Ray and write an image grid",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder")
    p.add_argument("--base-model", default="toy", help="base model spec")
    p.add_argument("--images", type=Path,
                   help="subject photos (default: the toy subject 'ball-halves' for the toy model, else DreamBench 'dog')")
    p.add_argument("--class-noun", default="dog")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    p.set_defaults(handler=run)


def _find_images(args: argparse.Namespace) -> tuple[Path, str]:
    if args.images:
        return args.images, args.class_noun
    if args.base_model == "toy":
        from dreamfleet.toy.subjects import SUBJECTS_BY_ID, subject_images

        subject = SUBJECTS_BY_ID["ball-halves"]
        folder = args.out / "subject" / subject.subject_id
        folder.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(subject_images(subject, 5)):
            img.save(folder / f"{i:02d}.png")
        return folder, subject.cls
    for root in (Path.cwd(), *Path.cwd().parents):
        candidate = root.parent / "shared" / "dreambench" / "dog"
        if candidate.is_dir():
            return candidate, "dog"
        if (root / ".git").exists():
            break
    folder = args.out / "subject"
    _synthetic_subject(folder)
    return folder, "ball"


def _synthetic_subject(folder: Path) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        img = Image.new("RGB", (128, 128), (90 + 30 * i, 160, 90))
        d = ImageDraw.Draw(img)
        x, y = 30 + 10 * i, 40 - 5 * i
        d.ellipse((x, y, x + 60, y + 60), fill=(200, 40, 40))
        d.rectangle((x + 22, y + 10, x + 38, y + 50), fill=(250, 220, 0))
        img.save(folder / f"{i:02d}.png")


def run(args: argparse.Namespace) -> int:
    import ray

    from dreamfleet.core.images import image_grid, load_subject_images

    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    images_dir, class_noun = _find_images(args)
    load_subject_images(images_dir)  # fail fast, on the driver, with a clear message
    print(f"subject photos: {images_dir} (class '{class_noun}')")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        task = ray.remote(num_cpus=args.num_cpus)(_train_remote)
        expert_dir, info = ray.get(task.remote(str(images_dir), class_noun, args.base_model, args.steps, str(out)))
    finally:
        ray.shutdown()
    print(f"expert: {expert_dir}  (identifier '{info['identifier']}', final loss {info['final_loss']:.4f})")
    rows, cols = _grid_rows(Path(expert_dir), args.base_model, images_dir)
    grid_path = out / "grid.png"
    image_grid(rows, rows=len(rows) // cols, cols=cols).save(grid_path)
    print(f"grid: {grid_path}")
    print("  row 1: training photos; rows 2-4: the expert on "
          + ", ".join(repr(p) for p in DEMO_PROMPTS) + "; rows 5-7: the base model on the same prompts")
    if args.base_model == "tiny-random":  # (the toy model's generations are meaningful)
        print("  note: tiny-random is an untrained random model, so its images are noise; "
              "pass --base-model with a real Stable Diffusion folder for meaningful pictures")
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return 0


def _train_remote(images_dir: str, class_noun: str, base_model: str, steps: int, out: str):
    from dreamfleet.core.images import load_subject_images
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.config import TrainConfig
    from dreamfleet.trainers.dreambooth import SubjectData, train_subject

    photos = load_subject_images(images_dir)
    subject = SubjectData(
        subject_id=Path(images_dir).name, class_noun=class_noun, images=[p.image for p in photos], source=images_dir
    )
    # The toy microbench's recipe (docs/microbench.md): full fine-tuning at 3e-4 with prior preservation.
    cfg = TrainConfig(steps=steps, method="full", learning_rate=3e-4, num_class_images=16,
                      validation_every=max(steps // 2, 1), checkpoint_every=max(steps // 2, 1))
    result = train_subject(subject, base_model, cfg, Path(out) / "experts" / subject.subject_id,
                           class_cache=ClassImageCache(Path(out) / "class-images"), overwrite=True, progress=False)
    return str(result.expert_dir), result.info.to_dict()


def _grid_rows(expert_dir: Path, base_model: str, images_dir: Path):
    import torch

    from dreamfleet.core.expert import ExpertInfo
    from dreamfleet.core.images import load_subject_images
    from dreamfleet.core.models import load_base

    info = ExpertInfo.read(expert_dir)
    base = load_base(base_model)
    res, cols = base.resolution, 4
    train = [p.image.resize((res, res)) for p in load_subject_images(images_dir)][:cols]
    train += [train[-1]] * (cols - len(train))
    pipe = base.pipeline()

    def generate(prompt_template: str) -> list:
        gens = [torch.Generator().manual_seed(i) for i in range(cols)]
        return pipe([info.prompt(prompt_template)] * cols, num_inference_steps=25, height=res, width=res,
                    generator=gens).images

    base_rows = [img for t in DEMO_PROMPTS for img in generate(t)]
    if info.method == "lora":
        pipe.load_lora_weights(str(expert_dir))
    else:
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(expert_dir / "unet")
    expert_rows = [img for t in DEMO_PROMPTS for img in generate(t)]
    return train + expert_rows + base_rows, cols
