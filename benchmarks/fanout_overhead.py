"""Platform overhead per subject of the fan-out, on the embedded local Ray.

Overhead = wall time of ``run_fanout`` minus the time spent inside optimizer steps, per
subject. It holds everything else: worker-group start and teardown (Ray Train ``fit``),
leasing, loading the base model, preparing data, LoRA setup, the final validation grid,
writing the expert and publishing it to the registry. Class images are generated once
before the timed runs (the cache is shared, as in production).

    .venv/bin/python benchmarks/fanout_overhead.py --subjects 1 8 32 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_manifest(root: Path, n: int) -> str:
    from helpers import subject_folder

    from dreamfleet.data.build import BuildConfig
    from dreamfleet.data.manifest import build_from_folders

    src = root / f"src{n}"
    rows = ["subject_id,class_noun"]
    for i in range(n):
        subject_folder(src, f"s{i:03d}", n=3, seed=i)
        rows.append(f"s{i:03d},{['dog', 'cat', 'ball'][i % 3]}")
    (src / "classes.csv").write_text("\n".join(rows) + "\n")
    out = root / f"manifest{n}"
    build_from_folders(src, src / "classes.csv", out, BuildConfig(min_side=32))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/fanout_overhead.json")
    args = ap.parse_args()

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from helpers import fast_config

    from dreamfleet.control.cluster import connect_ray
    from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
    from dreamfleet.registry import Registry

    root = Path(tempfile.mkdtemp(prefix="dreamfleet-bench-"))
    t = time.perf_counter()
    connect_ray(None, num_cpus=os.cpu_count())
    ray_start = time.perf_counter() - t
    cfg = fast_config(steps=args.steps, checkpoint_every=0, validation_every=0, learning_rate=1e-3)
    fan = FanoutConfig(max_concurrent=args.max_concurrent, class_cache=str(root / "class-images"))
    # warm the class-image cache and the imports once, untimed
    run_fanout(build_manifest(root, 3), str(root / "warm"), "tiny-random", cfg, fan, progress=False)

    results = []
    for n in args.subjects:
        manifest = build_manifest(root, n)
        reg_uri = str(root / f"reg{n}")
        t = time.perf_counter()
        summary = run_fanout(manifest, reg_uri, "tiny-random", cfg, fan, progress=False)
        wall = time.perf_counter() - t
        reg = Registry(reg_uri)
        step_time = sum(reg.expert_info(s).train_stats["step_time_s"] for s in summary.done)
        per_subject_wall = [reg.expert_info(s).wall_time_s for s in summary.done]
        row = {
            "subjects": n, "done": len(summary.done), "failed": len(summary.failed), "wall_s": round(wall, 2),
            "train_step_s": round(step_time, 2), "overhead_s": round(wall - step_time, 2),
            "overhead_per_subject_s": round((wall - step_time) / n, 3),
            "median_subject_wall_s": round(statistics.median(per_subject_wall), 3),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "steps": args.steps, "max_concurrent": args.max_concurrent, "ray_start_s": round(ray_start, 2),
        "command": " ".join(["python", *sys.argv]), "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
