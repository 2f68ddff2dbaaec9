"""What compiled bytecode (``make install`` runs ``uv pip sync --compile-bytecode``) saves each
new Python process: the same commands with and without the venv's ``.pyc`` files, interleaved
(A B A B ...) on one machine.

Without bytecode means what a venv installed by uv looks like where ``PYTHONDONTWRITEBYTECODE``
is set (as in this image): every process compiles torch, diffusers and Ray from source. It is
simulated here by pointing ``PYTHONPYCACHEPREFIX`` at an empty folder, so Python finds no
``.pyc`` and writes none; Ray's worker processes inherit the variable.

Measured per mode: importing the trainer (``import dreamfleet.trainers.fit``), ``ray.init()``
of an embedded Ray, its first task, one empty ``WorkerGroupTrainer.fit()`` (split at the
moment the training function runs, as ``fit_overhead.py``), and with ``--demo`` one run of the
demo the test suite runs (one toy subject, 4 steps).

    .venv/bin/python benchmarks/bytecode.py --repeats 3 [--demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

RAY_PROBE = """
import json, tempfile, time
t0 = time.time()
import ray
from dreamfleet.control.trainer import WorkerGroupTrainer
from fit_overhead import one_fit
t1 = time.time()
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
         runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
t2 = time.time()
ray.get(ray.remote(lambda: 1).remote())
t3 = time.time()
with tempfile.TemporaryDirectory(prefix="bytecode-") as storage:
    start, end = one_fit(WorkerGroupTrainer, 1, storage)
print(json.dumps({"import_ray_s": t1 - t0, "ray_init_s": t2 - t1, "first_task_s": t3 - t2,
                  "fit_start_s": start, "fit_end_s": end}))
"""


def env_for(mode: str, empty: str) -> dict[str, str]:
    # PYTHONPATH: the workers unpickle fit_overhead's training function by its module name
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": str(HERE)}
    if mode == "source":
        env["PYTHONPYCACHEPREFIX"] = empty
    else:
        env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def timed(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"{cmd[:3]} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t, r.stdout


def one_round(mode: str, empty: str, demo: bool) -> dict[str, float]:
    env = env_for(mode, empty)
    row = {"import_trainer_s": timed([sys.executable, "-c", "import dreamfleet.trainers.fit"], env)[0]}
    row.update(json.loads(timed([sys.executable, "-c", RAY_PROBE], env)[1].splitlines()[-1]))
    if demo:
        with tempfile.TemporaryDirectory() as tmp:
            row["demo_s"] = timed([sys.executable, "-m", "dreamfleet.cli.main", "demo", "--out", f"{tmp}/demo",
                                   "--subjects", "ball-halves", "--steps", "4", "--class-images", "4",
                                   "--eval-images", "1"], env, cwd=tmp)[0]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo", action="store_true", help="also time the test suite's one-subject demo")
    ap.add_argument("--out", default="benchmarks/results/bytecode.json")
    args = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"source": [], "bytecode": []}
    with tempfile.TemporaryDirectory(prefix="no-pyc-") as empty:
        for _ in range(args.repeats):
            for mode in rows:
                rows[mode].append(one_round(mode, empty, args.demo))
                print(mode, {k: round(v, 1) for k, v in rows[mode][-1].items()}, flush=True)
        assert not any(Path(empty).iterdir()), "the source runs wrote bytecode after all"
    result = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "repeats": args.repeats}
    for mode, runs in rows.items():
        result[mode] = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    result["ratio"] = {k: round(result["bytecode"][k] / result["source"][k], 3) for k in result["source"]}
    for k in result["source"]:
        print(f"{k:18s} median without {result['source'][k]:6.1f} s  with {result['bytecode'][k]:6.1f} s  "
              f"ratio {result['ratio'][k]:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
