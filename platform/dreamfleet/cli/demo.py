"""`dreamfleet demo`: the platform's main job end to end on the embedded default.

Four toy subjects (one per toy class) go through the real fan-out
(:func:`dreamfleet.control.orchestrator.run_fanout` on an embedded local Ray: class images
with Ray Data, DreamBooth in Ray Train worker groups, experts published to a registry) with
the microbench's recipe on the toy model shipped in the repository. Each expert and the
untouched base model are then evaluated with the toy metrics (in Ray tasks), and the demo
writes ``results.md`` (the metric table) and ``grid.png``: each subject's training photos
beside its expert's generations in the five contexts, with the base model's below.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("dreamfleet")

# One subject per toy class; of the three balls, two boxes and two cups, the one whose expert
# (with prior preservation) draws it best in the microbench (docs/microbench.md).
DEMO_SUBJECTS = ("ball-halves", "box-diagonal", "cup-band", "kite-cross")
CELL = 96  # px of one image in grid.png (the toy model draws 32 px)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train toy subjects through the fan-out on an embedded local Ray; write results.md and grid.png",
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (its registry is replaced)")
    p.add_argument("--base-model", default="toy", help="base model spec: toy (the UNet) or toy-flux (the Flux transformer), "
                   "each with its microbench recipe")
    p.add_argument("--subjects", default=",".join(DEMO_SUBJECTS), help="comma-separated toy subject ids")
    p.add_argument("--images", type=Path, help="a folder of your own photos to train instead of the toy subjects")
    p.add_argument("--class-noun", default="dog", help="the class of the --images subject")
    p.add_argument("--steps", type=int, help="DreamBooth steps (default: the microbench recipe's)")
    p.add_argument("--class-images", type=int,
                   help="class images for prior preservation (default: the microbench recipe's 50)")
    p.add_argument("--prior-loss-weight", type=float,
                   help="λ of the prior-preservation loss (default: the recipe's 1; on toy-flux 0.3 learns the subject "
                        "far better, docs/microbench.md)")
    p.add_argument("--eval-images", type=int, default=4,
                   help="images per evaluation prompt (default 4, as DreamBench; fewer is quicker and noisier)")
    p.add_argument("--eval-steps", type=int, default=25,
                   help="denoising steps of each evaluation image (default 25, as `dreamfleet eval`; fewer is a quicker look)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the embedded Ray (one subject trains per CPU)")
    p.set_defaults(handler=run)


def _write_manifest(args: argparse.Namespace, folder: Path) -> list[str]:
    """The demo's subjects as a manifest; returns their ids."""
    if args.images:
        from dreamfleet.core.images import list_image_files, load_subject_images
        from dreamfleet.data.build import BuildConfig, SubjectSpec, build_manifest
        from dreamfleet.toy.subjects import EVAL_PROMPTS

        load_subject_images(args.images)  # fail fast, on the driver, with a clear message
        spec = SubjectSpec(subject_id=args.images.name, class_noun=args.class_noun,
                           files=list_image_files(args.images), eval_prompts=list(EVAL_PROMPTS),
                           source=str(args.images))
        build_manifest([spec], folder, BuildConfig(min_side=16, min_images=1), overwrite=True)
        return [spec.subject_id]
    from dreamfleet.toy.subjects import SUBJECTS_BY_ID, write_subjects_manifest

    ids = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = [s for s in ids if s not in SUBJECTS_BY_ID]
    if unknown or not ids:
        from dreamfleet.core.errors import ConfigError

        raise ConfigError(f"unknown toy subject(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(SUBJECTS_BY_ID)}")
    write_subjects_manifest(folder, subjects=tuple(SUBJECTS_BY_ID[s] for s in ids), overwrite=True)
    return ids


def run(args: argparse.Namespace) -> int:
    import ray

    from dreamfleet.control.cluster import connect_ray
    from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
    from dreamfleet.eval.evaluate import EvalConfig, write_table
    from dreamfleet.eval.microbench import microbench_train_config
    from dreamfleet.registry import Registry

    t0 = time.perf_counter()
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ids = _write_manifest(args, out / "manifest")
    print(f"subjects: {', '.join(ids)} (manifest {out / 'manifest'})")
    shutil.rmtree(out / "registry", ignore_errors=True)  # a fresh run every time
    overrides = {"steps": args.steps, "num_class_images": args.class_images, "prior_loss_weight": args.prior_loss_weight}
    train_cfg = microbench_train_config(args.base_model, **{k: v for k, v in overrides.items() if v is not None})
    eval_cfg = EvalConfig(images_per_prompt=args.eval_images, num_inference_steps=args.eval_steps)
    fan = FanoutConfig(max_concurrent=max(1, min(args.num_cpus, len(ids))), cpus_per_worker=1,
                       class_cache=str(out / "class-images"), class_image_actors=args.num_cpus)
    connect_ray(None, num_cpus=args.num_cpus)
    try:
        summary = run_fanout(str(out / "manifest"), str(out / "registry"), args.base_model, train_cfg, fan,
                             subjects=ids, run_id="demo")
        print(f"{len(summary.done)} expert(s) trained through the fan-out, {time.perf_counter() - t0:.0f} s "
              f"so far (registry {out / 'registry'})")
        for sid, error in summary.failed.items():
            print(f"  FAILED {sid}: {error}")
        registry = Registry(out / "registry")
        versions = {sid: registry.latest(sid) for sid in summary.done}
        task = ray.remote(num_cpus=1)(_evaluate_subject)
        results = ray.get([task.remote(str(out / "manifest"), sid, str(registry.fetch(sid, versions[sid])),
                                       args.base_model, eval_cfg)
                           for sid in summary.done])
    finally:
        ray.shutdown()
    if not results:
        return 1
    store_evaluations(registry, versions, results, eval_cfg)
    rows = [row for r in results for row in r["rows"]]
    write_table(rows, out, title="dreamfleet demo: the toy model before and after DreamBooth")
    _results_md(out, results, train_cfg, eval_cfg, time.perf_counter() - t0)
    _grid(results).save(out / "grid.png")
    print(f"results: {out / 'results.md'}")
    print(f"grid: {out / 'grid.png'}  (per subject: training photos | the expert in the five contexts; "
          "below: the base model on the same prompts)")
    print(f"done in {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return 1 if summary.failed else 0


def _evaluate_subject(manifest: str, subject_id: str, expert_dir: str, base_model: str, c) -> dict[str, Any]:
    """Base model and expert on the subject's evaluation prompts (a Ray task: 1 CPU, 1 torch thread)."""
    from dreamfleet.core.expert import open_expert
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.eval.evaluate import (
        Scorers,
        SubjectCase,
        generate_case,
        score_case,
    )
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.metrics import photo_contexts

    m = Manifest.open(manifest)
    rec = m.record(subject_id)
    photos = [im for _, im, _ in m.read_images(subject_id)]
    scorers = Scorers.from_config(c, judge=ToyJudge.load())
    pipe, info = open_expert(Path(expert_dir))
    case = SubjectCase(subject_id, rec.class_noun, info.identifier, list(rec.eval_prompts), photos, label="DreamBooth")
    base_case = SubjectCase(subject_id, rec.class_noun, info.identifier, list(rec.eval_prompts), photos, label="base")
    base_gen = generate_case(load_base(base_model).pipeline(), base_case, c, with_identifier=False)
    gen = generate_case(pipe, case, c)
    known = subject_id in scorers.judge.subjects
    return {
        "subject": subject_id, "identifier": info.identifier, "class": rec.class_noun, "photos": photos,
        "prompts": gen.prompts, "expert": [row[0] for row in gen.images], "base": [row[0] for row in base_gen.images],
        "photo_contexts": sorted(photo_contexts(scorers.judge, photos)) if known else [],
        "rows": [score_case(base_gen, base_case, scorers, c), score_case(gen, case, scorers, c)],
    }


def store_evaluations(registry, versions: dict[str, str], results: list[dict], eval_cfg) -> None:
    """Each expert's metrics, with the base model's beside them and how they were measured (images
    per prompt, denoising steps), stored with the expert in the registry, where the dashboard's
    subject page shows them."""
    from dreamfleet.eval.evaluate import METRIC_COLUMNS

    for r in results:
        base, expert = r["rows"]
        metrics = {}
        for m in METRIC_COLUMNS:
            if m in expert:
                metrics[m] = expert[m]
            if m in base:
                metrics[f"{m} (base model)"] = base[m]
        registry.write_evaluation(r["subject"], versions[r["subject"]], {
            **metrics, "images_per_prompt": eval_cfg.images_per_prompt,
            "num_inference_steps": eval_cfg.num_inference_steps, "evaluated_by": "dreamfleet demo"})


def _results_md(out: Path, results: list[dict], train_cfg, eval_cfg, wall_s: float) -> None:
    lines = []
    for r in results:
        where = f": photos {', '.join(r['photo_contexts'])}" if r["photo_contexts"] else ""
        lines.append(f"- `{r['subject']}` ({r['class']}, identifier `{r['identifier']}`){where}")
    if any("subject_fidelity" in row for r in results for row in r["rows"]):
        table = (out / "results.md").read_text().split("\n", 2)[2]  # write_table's, without its title
    else:
        table = "(No toy metrics: the toy judge knows only the toy subjects.)\n"
    how = ("full fine-tuning of the denoiser" if train_cfg.method == "full"
           else f"LoRA (rank {train_cfg.lora_rank}) on the denoiser")
    text = f"""# dreamfleet demo

The toy base model before and after DreamBooth: {how},
{train_cfg.steps} steps at learning rate {train_cfg.learning_rate:g}, prior preservation with
{train_cfg.num_class_images} class images at λ {train_cfg.prior_loss_weight:g} (the recipe of `docs/microbench.md`); one expert per
subject, trained through the fan-out on an embedded local Ray. {wall_s:.0f} s in all.

{chr(10).join(lines)}

![grid](grid.png)

`grid.png`, one block per subject: its training photos, then the expert's images of
`a [V] <class> on the grass / in the snow / on the beach / at night / on a rug` (noise seed 0);
below them the base model's images of the same prompts without `[V]`. A gold frame marks a
context that none of the subject's photos shows: recontextualisation proper.

Metrics (the toy judge, `docs/toy_world.md`; {eval_cfg.images_per_prompt} image(s) per prompt, 6 prompts,
{eval_cfg.num_inference_steps} denoising steps each): subject
fidelity (is it the subject? the base model cannot draw it), subject similarity, prompt
fidelity (class and context as prompted: close to the base model's means the expert still
follows prompts), the same over the novel contexts only, and class drift (does the plain
`a <class>` now draw the subject?).

{table}"""
    (out / "results.md").write_text(text)


def _grid(results: list[dict]):
    from PIL import Image, ImageDraw, ImageFont

    from dreamfleet.toy.metrics import parse_prompt

    font = ImageFont.load_default(13)
    prompts = results[0]["prompts"]
    # The prompts that name a context (all of them if none does): "new contexts".
    cols = [j for j, p in enumerate(prompts) if parse_prompt(p).context is not None] or list(range(len(prompts)))
    n_photos = max(len(r["photos"]) for r in results)
    n_prompts = len(cols)
    label_w, gap, pad, head = 120, 24, 4, 22
    width = label_w + n_photos * (CELL + pad) + gap + n_prompts * (CELL + pad)
    height = head + len(results) * (2 * (CELL + pad) + gap)
    grid = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(grid)
    x_gen = label_w + n_photos * (CELL + pad) + gap
    d.text((label_w, 4), "training photos", fill="black", font=font)
    for k, j in enumerate(cols):
        d.text((x_gen + k * (CELL + pad), 4), parse_prompt(prompts[j]).context or prompts[j], fill="black", font=font)
    for i, r in enumerate(results):
        y = head + i * (2 * (CELL + pad) + gap)
        d.text((4, y + 4), r["subject"], fill="black", font=font)
        d.text((4, y + 22), "DreamBooth", fill="black", font=font)
        d.text((4, y + CELL + pad + 4), "base model", fill="dimgray", font=font)
        for k, im in enumerate(r["photos"]):
            grid.paste(im.convert("RGB").resize((CELL, CELL), Image.NEAREST), (label_w + k * (CELL + pad), y))
        for k, j in enumerate(cols):
            prompt, x = r["prompts"][j], x_gen + k * (CELL + pad)
            grid.paste(r["expert"][j].resize((CELL, CELL), Image.NEAREST), (x, y))
            grid.paste(r["base"][j].resize((CELL, CELL), Image.NEAREST), (x, y + CELL + pad))
            ctx = parse_prompt(prompt).context
            if ctx is not None and r["photo_contexts"] and ctx not in r["photo_contexts"]:
                d.rectangle((x - 2, y - 2, x + CELL + 1, y + CELL + 1), outline=(230, 170, 0), width=3)
    return grid
