"""Fixed cost of one Ray Train ``fit()`` with an empty training function: Ray's stock
``TorchTrainer`` against dreamfleet's ``WorkerGroupTrainer`` (dreamfleet.control.trainer), on
one embedded local Ray, interleaved (A B A B ...) so that both see the same machine.

Each fit is split at the moment the training function runs: *start* (controller, placement
group, worker processes, process group) and *end* (from the function's return until ``fit()``
returns).

    .venv/bin/python benchmarks/fit_overhead.py --repeats 5 [--workers 1] [--dashboard]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def touch(config: dict) -> None:
    """The training function: write the time it ran, nothing else."""
    Path(config["stamp"]).write_text(repr(time.time()))


def one_fit(cls, workers: int, storage: str) -> tuple[float, float]:
    from ray.train import RunConfig, ScalingConfig

    with tempfile.TemporaryDirectory() as tmp:
        stamp = Path(tmp) / "ran"
        t0 = time.time()
        cls(touch, train_loop_config={"stamp": str(stamp)}, scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(storage_path=storage)).fit()
        t1, ran = time.time(), float(stamp.read_text())
    return ran - t0, t1 - ran


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dashboard", action="store_true", help="start the embedded Ray with its dashboard")
    ap.add_argument("--out", default="benchmarks/results/fit_overhead.json")
    args = ap.parse_args()
    os.environ["RAY_TRAIN_V2_ENABLED"] = "1"
    import ray
    from ray.train.torch import TorchTrainer

    from dreamfleet.control.trainer import WorkerGroupTrainer

    ray.init(address="local", num_cpus=max(2, args.workers), include_dashboard=args.dashboard, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    storage = tempfile.mkdtemp(prefix="fit-overhead-")  # Ray Train's run folders; removed at the end
    one_fit(WorkerGroupTrainer, args.workers, storage)  # warm-up: Ray's first-use actors and caches
    rows = {"TorchTrainer": [], "WorkerGroupTrainer": []}
    for _ in range(args.repeats):
        for cls in (TorchTrainer, WorkerGroupTrainer):
            rows[cls.__name__].append(one_fit(cls, args.workers, storage))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "workers": args.workers, "dashboard": args.dashboard, "repeats": args.repeats}
    for name, fits in rows.items():
        result[name] = {k: round(statistics.median(v), 2) for k, v in
                        (("start_s", [s for s, _ in fits]), ("end_s", [e for _, e in fits]),
                         ("total_s", [s + e for s, e in fits]))}
        print(f"{name:20s} median start {result[name]['start_s']:6.1f} s  end {result[name]['end_s']:5.1f} s  "
              f"total {result[name]['total_s']:6.1f} s   ({args.repeats} fits)")
    result["ratio_total"] = round(result["WorkerGroupTrainer"]["total_s"] / result["TorchTrainer"]["total_s"], 3)
    print(f"WorkerGroupTrainer / TorchTrainer, median total: {result['ratio_total']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
