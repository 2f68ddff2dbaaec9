"""SuTI on the toy world, end to end: many experts -> gather -> apprentice -> held-out evaluation.

Stages (each skipped when its output exists, so an interrupted run continues):

1. ``train-manifest``: N procedurally generated subjects (:func:`procedural_subjects`), none
   of them one of the eight named toy subjects; ``heldout-manifest``: the eight named ones.
2. ``registry``: a LoRA DreamBooth expert per training subject, through the real fan-out.
3. ``demo-set``: ``gather`` (Ray Data) renders, scores and filters the experts' outputs.
4. ``apprentice``: trained on the demonstration set on Ray Train.
5. ``heldout-registry``: DreamBooth experts of the held-out subjects (the microbench recipe),
   the baseline the apprentice is compared with.
6. evaluation on the held-out subjects, with the toy metrics, of the base model, the held-out
   experts and the apprentice (zero-shot: the subject's photos as demonstrations); plus time
   to the first image (fine-tuning + generation for an expert; demonstration encoding +
   generation for the apprentice).

It drives the control plane (fan-out, gather, apprentice training), so it lives here with the
other benchmarks rather than in the package's toy world::

    .venv/bin/python benchmarks/apprentice_bench.py --out runs/apprentice   # ~70 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dreamfleet.core.config import cfg

log = logging.getLogger("dreamfleet")


@dataclass
class ApprenticeBenchConfig:
    train_subjects: int = cfg(96, "procedurally generated training subjects (one expert each)")
    expert_steps: int = cfg(200, "LoRA DreamBooth steps of each training expert")
    expert_lr: float = cfg(1e-3, "their learning rate")
    expert_rank: int = cfg(8, "their LoRA rank")
    max_concurrent: int = cfg(2, "worker groups / gather actors in parallel")
    threshold: float = cfg(0.05, "gather filter: fidelity gain over the base render")
    images_per_prompt: int = cfg(2, "gather: renders per expert and template")
    apprentice_steps: int = cfg(4000, "apprentice optimizer steps")
    apprentice_batch: int = cfg(16, "apprentice batch size")
    apprentice_lr: float = cfg(3e-3, "apprentice learning rate")
    photo_targets: float = cfg(0.5, "also train an apprentice with this fraction of photo targets (0: skip it)")
    heldout: list[str] = cfg([], "held-out subjects to evaluate (default: all eight named toy subjects)")
    heldout_train: dict[str, Any] = cfg(
        {"steps": 400, "learning_rate": 3e-4},
        "overrides of the held-out experts' recipe (the microbench's; pinned to the one docs/apprentice.md measured)",
    )
    compare_unfiltered: bool = cfg(True, "also train an apprentice on the unfiltered renders (the filter's effect)")
    eval_images_per_prompt: int = cfg(4, "evaluation images per prompt (DreamBench: 4)")
    seed: int = cfg(0, "seed of every stage")


def run_apprentice_bench(out: str | Path, c: ApprenticeBenchConfig | None = None) -> dict[str, Any]:
    import torch

    from dreamfleet.control.apprentice import ApprenticeRuntime
    from dreamfleet.control.apprentice import train as train_apprentice_ray
    from dreamfleet.control.gather import GatherConfig, gather
    from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
    from dreamfleet.core.artifacts import write_json
    from dreamfleet.data.demos import filter_demo_set
    from dreamfleet.eval.microbench import microbench_train_config
    from dreamfleet.toy.subjects import SUBJECTS, procedural_subjects, write_subjects_manifest
    from dreamfleet.trainers.apprentice import ApprenticeConfig
    from dreamfleet.trainers.config import TrainConfig

    c = c or ApprenticeBenchConfig()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    heldout = [s for s in SUBJECTS if not c.heldout or s.subject_id in c.heldout]

    def stage(name: str, path: Path, fn) -> None:
        if path.exists():
            log.info("stage %s: %s exists, skipped", name, path)
            return
        t0 = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("stage %s done in %.0f s", name, timings[name])

    train_m, held_m = out / "train-manifest", out / "heldout-manifest"
    stage("manifests", train_m, lambda: write_subjects_manifest(train_m, subjects=procedural_subjects(c.train_subjects)))
    if not held_m.exists():
        write_subjects_manifest(held_m, subjects=tuple(heldout))

    expert_cfg = TrainConfig(method="lora", steps=c.expert_steps, learning_rate=c.expert_lr, lora_rank=c.expert_rank,
                             with_prior_preservation=False, checkpoint_every=0, validation_every=0,
                             num_validation_images=1, validation_inference_steps=2,
                             validation_prompts=["a {identifier} {class_noun}"], seed=c.seed, device="cpu")
    fan = FanoutConfig(max_concurrent=c.max_concurrent)
    registry = out / "registry"
    stage("experts", registry / ".experts-done",
          lambda: (run_fanout(str(train_m), str(registry), "toy", expert_cfg, fan, progress=False),
                   (registry / ".experts-done").write_text("ok")))

    all_set, demo_set = out / "demo-set-all", out / "demo-set"
    stage("gather", all_set, lambda: print(gather(str(registry), all_set, GatherConfig(
        threshold=-1.0, min_prompt_score=-1.0, images_per_prompt=c.images_per_prompt,
        concurrency=c.max_concurrent)).format()))
    stage("filter", demo_set, lambda: print(filter_demo_set(all_set, demo_set, threshold=c.threshold)))

    acfg = ApprenticeConfig(steps=c.apprentice_steps, batch_size=c.apprentice_batch, learning_rate=c.apprentice_lr,
                            checkpoint_every=500, seed=c.seed, device="cpu")
    runtime = ApprenticeRuntime(workers=1, cpus_per_worker=float(c.max_concurrent))
    apprentices = {"apprentice (zero-shot)": (out / "apprentice", demo_set, acfg)}
    if c.photo_targets > 0:
        apprentices["apprentice, renders + photo targets"] = (
            out / "apprentice-photos", demo_set, dataclasses.replace(acfg, photo_targets=c.photo_targets))
    if c.compare_unfiltered:
        apprentices["apprentice, unfiltered renders"] = (out / "apprentice-unfiltered", all_set, acfg)
    for name, (app_dir, data, ac) in apprentices.items():
        stage(name, app_dir,
              lambda app_dir=app_dir, data=data, ac=ac: train_apprentice_ray(data, "toy", ac, app_dir, runtime))

    held_reg = out / "heldout-registry"
    held_cfg = microbench_train_config(**c.heldout_train)
    stage("heldout-experts", held_reg / ".experts-done",
          lambda: (run_fanout(str(held_m), str(held_reg), "toy", held_cfg, fan, progress=False),
                   (held_reg / ".experts-done").write_text("ok")))

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    _rows, ttfi = evaluate_heldout(out, held_m, held_reg, {k: v[0] for k, v in apprentices.items()}, c)
    timings["evaluate"] = round(time.perf_counter() - t0, 1)
    summary = {"config": asdict(c), "timings_s": timings, "time_to_first_image": ttfi,
               "gather": json.loads((all_set / "gather.json").read_text()),
               "filter": json.loads((demo_set / "gather.json").read_text())}
    write_json(out / "bench.json", summary)
    return summary


def evaluate_heldout(out: Path, held_m: Path, held_reg: Path, app_dirs: dict[str, Path], c: ApprenticeBenchConfig):
    import torch

    from dreamfleet.core.apprentice import Apprentice
    from dreamfleet.core.expert import ExpertInfo, open_expert
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.eval.evaluate import (
        EvalConfig,
        Scorers,
        SubjectCase,
        evaluate_case,
        write_table,
    )
    from dreamfleet.registry import Registry
    from dreamfleet.toy.judge import ToyJudge

    ec = EvalConfig(images_per_prompt=c.eval_images_per_prompt, seed=c.seed)
    scorers = Scorers.from_config(ec, judge=ToyJudge.load())
    m = Manifest.open(held_m)
    reg = Registry(str(held_reg), create=False)
    t0 = time.perf_counter()
    apprentices = {name: Apprentice.load(d) for name, d in app_dirs.items()}
    app_load_s = (time.perf_counter() - t0) / len(apprentices)
    rows: list[dict[str, Any]] = []
    ttfi: dict[str, list[float]] = {"expert_train_s": [], "expert_first_image_s": [], "apprentice_first_image_s": []}
    for sid in m.subject_ids():
        rec = m.record(sid)
        photos = [im for _, im, _ in m.read_images(sid)]
        templates = list(rec.eval_prompts)
        base_pipe = load_base("toy", fresh=False).pipeline()
        rows.append(evaluate_case(base_pipe, SubjectCase(sid, rec.class_noun, "", templates, photos, label="base"),
                                  scorers, ec, with_identifier=False, grid_path=out / "eval" / "grids" / "base" / f"{sid}.png"))
        folder = reg.fetch(sid)
        info = ExpertInfo.read(folder)
        t1 = time.perf_counter()
        pipe, _ = open_expert(folder)
        pipe([info.prompt("a {subject} in the snow")], num_inference_steps=ec.num_inference_steps,
             guidance_scale=ec.guidance_scale, generator=[torch.Generator().manual_seed(0)])
        ttfi["expert_train_s"].append(info.wall_time_s)
        ttfi["expert_first_image_s"].append(time.perf_counter() - t1)
        rows.append(evaluate_case(pipe, SubjectCase(sid, rec.class_noun, info.identifier, templates, photos,
                                                    label="expert (DreamBooth)"),
                                  scorers, ec, grid_path=out / "eval" / "grids" / "expert" / f"{sid}.png"))
        for k, (name, apprentice) in enumerate(apprentices.items()):
            t1 = time.perf_counter()
            bound = apprentice.bind(photos)
            bound(["a [V] " + rec.class_noun + " in the snow"], num_inference_steps=ec.num_inference_steps,
                  guidance_scale=ec.guidance_scale, generator=[torch.Generator().manual_seed(0)])
            if k == 0:
                ttfi["apprentice_first_image_s"].append(time.perf_counter() - t1)
            rows.append(evaluate_case(bound, SubjectCase(sid, rec.class_noun, apprentice.identifier, templates, photos,
                                                         label=name),
                                      scorers, ec, grid_path=out / "eval" / "grids" / f"apprentice-{k}" / f"{sid}.png"))
        log.info("evaluated %s", sid)
    write_table(rows, out / "eval", title="Held-out toy subjects: base vs DreamBooth experts vs apprentice")
    med = {k: statistics.median(v) for k, v in ttfi.items()}
    expert_total = med["expert_train_s"] + med["expert_first_image_s"]
    summary = {**{f"median_{k}": round(v, 3) for k, v in med.items()}, "apprentice_load_s": round(app_load_s, 2),
               "expert_total_s": round(expert_total, 2),
               "speedup": round(expert_total / med["apprentice_first_image_s"], 1),
               "speedup_including_load": round(expert_total / (med["apprentice_first_image_s"] + app_load_s), 1)}
    return rows, summary


def main() -> int:
    from dreamfleet.core import config as C

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="work folder (stages already there are skipped)")
    C.add_arguments(p, ApprenticeBenchConfig, skip=("heldout_train",))
    args = p.parse_args()
    c = C.from_dict(ApprenticeBenchConfig, C.overrides_from_args(ApprenticeBenchConfig, args))
    summary = run_apprentice_bench(args.out, c)
    print((args.out / "eval" / "results.md").read_text())
    print(json.dumps(summary["time_to_first_image"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
