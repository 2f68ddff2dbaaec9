"""Multi-subject LoRA packing against sequential solo LoRA runs: subjects per GPU-hour (issue 9, item 4).

Both variants train the same S subjects (synthetic photos, one seed each), with the same
base model, resolution, steps, prior preservation and hyperparameters:

- ``sequential``: S solo LoRA DreamBooth runs one after another, as ``train_subject`` runs
  them (``prepare_subject`` + ``setup_trainable`` + ``DreamBoothObjective`` + ``run_loop``);
  between subjects the adapter is unloaded, so each starts from the plain base model.
- ``packed``: one packed run of the S subjects (``prepare_subject`` for each +
  ``setup_packed`` + ``PackedObjective`` + ``run_loop`` with ``PackedEngine``).

Each run is a fresh subprocess (peak memory is that variant's alone), in the order
sequential, packed, sequential, packed, ...; the base model is built once per process and
not timed (a fleet worker keeps it), nor are publishing and validation images (the same
work per subject in both). The report gives min/median/max, the ratio of medians and the
ratio of each back-to-back pair, and each subject's final loss in both variants.

    .venv/bin/python benchmarks/packing.py --model tiny --subjects 4 8 --steps 40 --warmup 5 \\
        --repeats 3 --threads 1
    .venv/bin/python benchmarks/packing.py --model sd15 --resolution 512 --subjects 4 8 \\
        --steps 20 --warmup 3 --repeats 3                                   # on a GPU, bf16

``--model sd15`` is trainer_vs_diffusers.py's SD-1.5-sized model with random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_vs_diffusers as tvd  # build_base, RssSampler, summary, machine, sync

VARIANTS = ("sequential", "packed")


@dataclass
class PackSpec(tvd.Spec):
    """trainer_vs_diffusers' Spec (what both variants share; the worker subprocess gets it as
    JSON), for S LoRA subjects that differ only in their seed."""

    subjects: int = 4
    subject_steps: int = 400

    def train_config(self, i: int = 0):
        """Subject i's config: the shared settings, its own seed."""
        return dataclasses.replace(super().train_config(), method="lora", seed=self.seed + i)


def setup_subjects(spec: PackSpec, base, root: Path):
    """S synthetic subjects of class 'dog', and the shared class-image cache filled beforehand."""
    from dreamfleet.trainers.dreambooth import SubjectData

    cfg = spec.train_config(0).resolve(native_resolution=base.resolution)
    cache = tvd.class_image_cache(base, cfg, root)
    subjects = [
        SubjectData(f"bench_dog{i}", "dog", tvd.synthetic_photos(1000 * i, spec.num_instance, cfg.resolution))
        for i in range(spec.subjects)
    ]
    return subjects, [spec.train_config(i) for i in range(spec.subjects)], cache


class Stamps:
    """Wall and CPU time after every optimizer step of one run (synchronised on a GPU).

    CPU time is this process's own (all its threads): on a shared CPU it counts the work
    done, not the time other processes held the cores, so it is the steadier CPU figure.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.start = (time.perf_counter(), time.process_time())
        self.times: list[tuple[float, float]] = []

    def __call__(self, step: int, metrics: dict) -> None:
        tvd.sync(self.device)
        self.times.append((time.perf_counter(), time.process_time()))

    def timed(self, warmup: int) -> tuple[float, float]:
        """(wall s, CPU s) of the steps after the first ``warmup``."""
        first = self.times[warmup - 1] if warmup else self.start
        return self.times[-1][0] - first[0], self.times[-1][1] - first[1]


def run_sequential(base, subjects, cfgs, cache, spec: PackSpec) -> dict:
    from dreamfleet.trainers.dreambooth import (
        DreamBoothObjective,
        loop_settings,
        prepare_subject,
        setup_trainable,
    )
    from dreamfleet.trainers.loop import LoopHooks, run_loop

    timed, cpu, losses, device = 0.0, 0.0, {}, None
    for subject, cfg in zip(subjects, cfgs, strict=True):
        p = prepare_subject(subject, base, cfg, class_cache=cache)
        setup_trainable(p)
        objective = DreamBoothObjective.from_prepared(p)
        stamps = Stamps(p.device)
        result = run_loop(objective, loop_settings(p, progress=False), hooks=LoopHooks(on_step=stamps))
        wall_s, cpu_s = stamps.timed(spec.warmup)
        timed, cpu = timed + wall_s, cpu + cpu_s
        losses[subject.subject_id] = result.history[-1]["loss"]
        base.unet.unload_lora()  # the next subject starts from the plain base model
        device = p.device
    return {
        "timed_s": timed,
        "timed_cpu_s": cpu,
        "optimizer_steps": spec.subjects * spec.steps,
        "losses": losses,
        "device": device,
    }


def run_packed(base, subjects, cfgs, cache, spec: PackSpec) -> dict:
    from dreamfleet.trainers.dreambooth import prepare_subject
    from dreamfleet.trainers.loop import LoopHooks, run_loop
    from dreamfleet.trainers.packing import (
        PackedEngine,
        packed_loop_settings,
        packed_objective,
        setup_packed,
        subject_result,
    )

    prepared = [prepare_subject(s, base, c, class_cache=cache) for s, c in zip(subjects, cfgs, strict=True)]
    packed = setup_packed(prepared)
    objective = packed_objective(prepared, packed)
    settings = packed_loop_settings(prepared, progress=False)
    stamps = Stamps(prepared[0].device)
    result = run_loop(
        objective, settings, hooks=LoopHooks(on_step=stamps), engine=PackedEngine(objective, settings)
    )
    losses = {sid: subject_result(result, sid).history[-1]["loss"] for sid in objective.subject_ids}
    return {
        "timed_s": stamps.timed(spec.warmup)[0],
        "timed_cpu_s": stamps.timed(spec.warmup)[1],
        "optimizer_steps": spec.steps,
        "losses": losses,
        "device": prepared[0].device,
    }


def run_variant(variant: str, spec: PackSpec) -> dict:
    """Train S subjects one way in this process and measure it."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    base = tvd.build_base(spec.model)
    with tempfile.TemporaryDirectory(prefix="dreamfleet-pack-") as tmp:
        return measure(variant, spec, base, Path(tmp))


def measure(variant: str, spec: PackSpec, base, root: Path) -> dict:
    subjects, cfgs, cache = setup_subjects(spec, base, root)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    fn = run_sequential if variant == "sequential" else run_packed
    load_before = os.getloadavg()[0]  # other processes on the machine: these figures are wall clock
    with tvd.RssSampler() as rss:
        t0 = time.perf_counter()
        out = fn(base, subjects, cfgs, cache, spec)
        tvd.sync(out["device"])
        wall = time.perf_counter() - t0
    subject_steps_per_s = spec.subjects * spec.steps / out["timed_s"]
    row = {
        "variant": variant,
        "subjects": spec.subjects,
        "step_ms": 1000 * out["timed_s"] / out["optimizer_steps"],  # one optimizer step of this variant
        "subject_steps_per_s": subject_steps_per_s,
        "subjects_per_hour": 3600 * subject_steps_per_s / spec.subject_steps,  # steady state, projected
        "subject_steps_per_cpu_s": spec.subjects * spec.steps / out["timed_cpu_s"],
        "wall_s": wall,
        "subjects_per_hour_end_to_end": 3600 * spec.subjects / wall,
        "rss_peak_mb": rss.peak / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_losses": out["losses"],
        "device": str(out["device"]),
        "threads": torch.get_num_threads(),
        "loadavg_1min": (load_before + os.getloadavg()[0]) / 2,
    }
    if out["device"].type == "cuda":
        row["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(out["device"]) / 2**20
    return row


def run_in_subprocess(variant: str, spec: PackSpec) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--spec", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the driver


def compare(spec: PackSpec, repeats: int, log=print) -> dict:
    """sequential, packed, sequential, packed, ... in fresh subprocesses."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r, variant in itertools.product(range(repeats), VARIANTS):
        row = run_in_subprocess(variant, spec)
        runs[variant].append(row)
        log(
            f"  S={spec.subjects} run {r + 1}/{repeats} {variant:10s} {row['subject_steps_per_s']:8.2f} subject-steps/s "
            f"{row['step_ms']:8.1f} ms/step  wall {row['wall_s']:6.1f} s  rss peak {row['rss_peak_mb']:6.0f} MiB"
        )
    out: dict = {"spec": asdict(spec)}
    keys = [
        "subject_steps_per_s",
        "subjects_per_hour",
        "subject_steps_per_cpu_s",
        "step_ms",
        "wall_s",
        "subjects_per_hour_end_to_end",
        "rss_peak_mb",
        "maxrss_mb",
        "loadavg_1min",
    ]
    keys += ["cuda_peak_allocated_mb"] if "cuda_peak_allocated_mb" in runs["sequential"][0] else []
    for variant, rows in runs.items():
        out[variant] = {k: tvd.summary([row[k] for row in rows]) for k in keys}
        out[variant]["final_losses_first_run"] = rows[0]["final_losses"]
        out[variant]["device"], out[variant]["threads"] = rows[0]["device"], rows[0]["threads"]
    seq, pk = out["sequential"], out["packed"]
    out["speedup"] = pk["subject_steps_per_s"]["median"] / seq["subject_steps_per_s"]["median"]
    pairs = [
        b["subject_steps_per_s"] / a["subject_steps_per_s"]
        for a, b in zip(runs["sequential"], runs["packed"], strict=True)
    ]
    out["paired_speedup"] = tvd.summary(pairs)
    metric = "subject_steps_per_cpu_s"
    out["cpu_time_speedup"] = pk[metric]["median"] / seq[metric]["median"]
    out["paired_cpu_time_speedup"] = tvd.summary(
        [b[metric] / a[metric] for a, b in zip(runs["sequential"], runs["packed"], strict=True)]
    )
    out["end_to_end_speedup"] = seq["wall_s"]["median"] / pk["wall_s"]["median"]
    mem = "cuda_peak_allocated_mb" if "cuda_peak_allocated_mb" in seq else "rss_peak_mb"
    out["memory_ratio"] = {"metric": mem, "packed_over_sequential": pk[mem]["median"] / seq[mem]["median"]}
    a, b = runs["sequential"][0]["final_losses"], runs["packed"][0]["final_losses"]
    out["final_loss_max_rel_diff"] = max(abs(b[k] - a[k]) / abs(a[k]) for k in a)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default="tiny", help="tiny (tiny-random), toy, sd15 (SD-1.5-sized, random weights)"
    )
    ap.add_argument("--subjects", type=int, nargs="+", default=[4, 8], help="pack sizes S to measure")
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them, in every run")
    ap.add_argument(
        "--subject-steps",
        type=int,
        default=400,
        help="a subject's full training length, for projecting subjects per hour",
    )
    ap.add_argument("--repeats", type=int, default=3, help="(sequential, packed) pairs per pack size")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    ap.add_argument("--no-prior", action="store_true", help="without prior preservation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument(
        "--out", default=None, help="JSON result (default: benchmarks/results/packing_<model>.json)"
    )
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        row = run_variant(args.worker, PackSpec(**json.loads(args.spec)))
        print(json.dumps(row))
        return row
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": tvd.machine(),
        "command": " ".join(sys.argv),
        "comparisons": {},
    }
    for s in args.subjects:
        spec = PackSpec(
            model=args.model,
            subjects=s,
            resolution=args.resolution,
            steps=args.steps,
            warmup=args.warmup,
            subject_steps=args.subject_steps,
            mixed_precision=args.mixed_precision,
            prior=not args.no_prior,
            device=args.device,
            threads=args.threads,
        )
        print(
            f"{args.model} S={s}: {args.repeats} x (sequential, packed), {args.steps} timed steps per subject"
        )
        cmp = compare(spec, args.repeats)
        seq, pk = cmp["sequential"], cmp["packed"]
        print(
            f"  median subjects/hour at {args.subject_steps} steps: sequential "
            f"{seq['subjects_per_hour']['median']:.1f}, packed {pk['subjects_per_hour']['median']:.1f}, "
            f"ratio {cmp['speedup']:.2f}x (paired: median {cmp['paired_speedup']['median']:.2f}x, "
            f"min {cmp['paired_speedup']['min']:.2f}x; per CPU-second {cmp['cpu_time_speedup']:.2f}x); memory {cmp['memory_ratio']['metric']} packed/sequential "
            f"{cmp['memory_ratio']['packed_over_sequential']:.2f}; final losses max rel diff "
            f"{cmp['final_loss_max_rel_diff']:.1e}"
        )
        result["comparisons"][str(s)] = cmp
    out = Path(args.out or Path(__file__).parent / "results" / f"packing_{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
