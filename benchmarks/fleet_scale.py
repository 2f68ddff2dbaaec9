"""The fan-out at 100 and 1,000 subjects on a local multi-node Ray cluster, registry on S3.

A head (no CPUs) and two worker nodes (one CPU each) as separate raylets on this machine,
moto's standalone S3 server (a real S3 API, its own process) holding the manifest, the
registry and Ray Train's checkpoints; the tiny model, a few LoRA steps per subject, no class
images (they are per class, not per subject, and measured elsewhere). For each size:

- subjects per minute, and platform overhead per subject (wall x groups - time in optimizer
  steps, per subject: everything the platform adds to training);
- peak memory (RSS) of the driver process and of the run's queue actor;
- S3 requests per subject, by method (moto's request recorder);
- what one dashboard poll costs: ``Registry.states()`` latency and S3 requests;
- one ``update_state``'s latency and requests, and a run's queued writes on 32 threads.

    .venv/bin/python benchmarks/fleet_scale.py --subjects 100 1000 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


class PeakRss(threading.Thread):
    """Samples the RSS of this process and of the run's queue actor every 0.5 s."""

    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self.me, self.psutil = psutil.Process(), psutil
        self.driver = self.queue = 0
        self.stop = threading.Event()

    def _queue_pid(self) -> int | None:
        import ray

        for actor in ray._private.state.actors().values():
            if actor["State"] == "ALIVE" and actor.get("ActorClassName", "").endswith("SubjectQueue"):
                return actor.get("Pid")
        return None

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.driver = max(self.driver, self.me.memory_info().rss)
            pid = self._queue_pid()
            if pid:
                with contextlib.suppress(self.psutil.Error):
                    self.queue = max(self.queue, self.psutil.Process(pid).memory_info().rss)


def s3_manifest(root: Path, n: int, bucket: str) -> str:
    import pyarrow.fs as pafs
    from fanout_overhead import build_manifest

    local = build_manifest(root, n)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}/x")
    pafs.copy_files(local, f"{bucket}/manifests/m{n}", destination_filesystem=fs)
    return f"s3://{bucket}/manifests/m{n}"


def by_method(requests: list[dict]) -> dict[str, int]:
    return dict(collections.Counter(r["method"] for r in requests))


def measure(n: int, args, server, root: Path, cfg, fan) -> dict:
    from dreamfleet.control.orchestrator import run_fanout
    from dreamfleet.registry import Registry

    manifest = s3_manifest(root, n, server.bucket("bench"))
    reg_uri = f"s3://{server.bucket('bench')}/registry"
    server.record()
    peak = PeakRss()
    peak.start()
    t = time.perf_counter()
    summary = run_fanout(manifest, reg_uri, "tiny-random", cfg, fan, progress=False)
    wall = time.perf_counter() - t
    peak.stop.set()
    requests = server.requests()
    reg = Registry(reg_uri)
    step_time = sum(reg.expert_info(s).train_stats["step_time_s"] for s in summary.done)
    server.record()
    t = time.perf_counter()
    states = reg.states()
    poll_s = time.perf_counter() - t
    poll_requests = len(server.requests())
    return {
        "subjects": n, "done": len(summary.done), "failed": len(summary.failed), "wall_s": round(wall, 1),
        "subjects_per_min": round(len(summary.done) / wall * 60, 1),
        "overhead_per_subject_s": round((wall * fan.max_concurrent - step_time) / n, 3),
        "driver_peak_rss_mb": round(peak.driver / 2**20, 1), "queue_peak_rss_mb": round(peak.queue / 2**20, 1),
        "s3_requests": len(requests), "s3_requests_per_subject": round(len(requests) / n, 1),
        "s3_requests_by_method": by_method(requests),
        "states_poll_s": round(poll_s, 2), "states_poll_requests": poll_requests, "states_listed": len(states),
    }


def registry_ops(server, n: int = 1000) -> dict:
    """Per-operation costs against the same server: one ``update_state`` alone, and ``n`` of
    them (a run's queued writes) one after another's rate vs on the fan-out's 32 threads."""
    from dreamfleet.core.storage import concurrently
    from dreamfleet.registry import Registry

    reg = Registry(f"s3://{server.bucket('ops')}/registry")
    ids = [f"s{i:05d}" for i in range(n)]
    t = time.perf_counter()
    for sid in ids[:100]:
        reg.update_state(sid, state="queued")
    one = (time.perf_counter() - t) / 100
    server.record()
    t = time.perf_counter()
    concurrently(lambda sid: reg.update_state(sid, state="queued"), ids)
    threaded = time.perf_counter() - t
    requests = len(server.requests())
    return {"update_state_ms": round(one * 1000, 1), "queued_writes": n, "queued_writes_threaded_s": round(threaded, 2),
            "queued_writes_sequential_s_est": round(one * n, 1), "requests_per_update_state": round(requests / n, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/fleet_scale.json")
    args = ap.parse_args()

    import ray
    from helpers import fast_config
    from ray.cluster_utils import Cluster
    from s3 import S3Server

    from dreamfleet.control.orchestrator import FanoutConfig

    root = Path(tempfile.mkdtemp(prefix="dreamfleet-scale-"))
    server = S3Server(root / "s3").start()
    os.environ.update({**server.env(), "RAY_TRAIN_V2_ENABLED": "1"})
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for name in ("node_a", "node_b"):
        cluster.add_node(num_cpus=1, resources={name: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="dreamfleet", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    cfg = fast_config(steps=args.steps, checkpoint_every=0, validation_every=0, with_prior_preservation=False)
    fan = FanoutConfig(max_concurrent=2)
    results = []
    try:
        for n in args.subjects:
            row = measure(n, args, server, root, cfg, fan)
            results.append(row)
            print(json.dumps(row), flush=True)
        ops = registry_ops(server)
        print(json.dumps(ops), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        server.stop()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; Ray head (0 CPUs) + 2 worker nodes (1 CPU each) "
                   "on this machine; moto S3 server (its own process)",
        "steps": args.steps, "command": " ".join(["python", *sys.argv]), "results": results, "registry_ops": ops,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
