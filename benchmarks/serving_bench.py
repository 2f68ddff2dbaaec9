"""Serving benchmark: warm overhead, cold adapter swaps, throughput with 1 vs 20 experts.

    .venv/bin/python benchmarks/serving_bench.py --requests 120 --clients 8
    .venv/bin/python benchmarks/serving_bench.py --base-model toy-flux --side 32 --out benchmarks/results/serving-toy-flux.json

Builds a registry of real LoRA experts (of tiny-random, or ``--base-model``) (trained here, a few steps each), starts
the Serve app on an embedded local Ray (127.0.0.1), and measures:

- warm latency: the base pipeline called directly, the engine with an expert active, and
  the same request over HTTP through Serve (ingress, routing, batching, PNG encoding);
- cold adapter swap: loading an expert into the engine from disk, and from the host-memory
  cache after it was evicted from the pipeline;
- throughput: requests per second from concurrent clients, all for one expert vs spread
  over 20 experts in rotation (the replica's LRU holds 8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def stats(xs: list[float]) -> dict[str, float]:
    return {"min_ms": round(min(xs) * 1000, 1), "median_ms": round(statistics.median(xs) * 1000, 1),
            "max_ms": round(max(xs) * 1000, 1), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="benchmarks/results/serving.json")
    ap.add_argument("--base-model", default="tiny-random", help="base of the experts (e.g. toy, toy-flux)")
    args = ap.parse_args()

    import httpx
    import torch
    from helpers import fast_config, picture
    from ray import serve

    from dreamfleet.control.cluster import connect_ray
    from dreamfleet.core.expert import ExpertInfo
    from dreamfleet.core.models import load_base
    from dreamfleet.registry import Registry
    from dreamfleet.serving.app import build_app, start_serve
    from dreamfleet.serving.config import ServeConfig
    from dreamfleet.serving.engine import ExpertEngine, GenItem
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    root = Path(tempfile.mkdtemp(prefix="dreamfleet-serve-bench-"))
    reg = Registry(root / "reg")
    base_expert = train_subject(SubjectData("e00", "dog", [picture(i) for i in range(3)]), args.base_model,
                                fast_config(steps=4), root / "experts" / "e00",
                                class_cache=ClassImageCache(root / "cache"), progress=False).expert_dir
    names = [f"e{i:02d}" for i in range(20)]
    for sid in names:  # 20 experts with the same (real) adapter weights under different ids
        dest = root / "clones" / sid
        shutil.copytree(base_expert, dest)
        info = json.loads((dest / "expert.json").read_text())
        info["subject_id"] = sid
        (dest / "expert.json").write_text(json.dumps(info))
        reg.publish(sid, dest)
    item = dict(prompt="a photo of {subject} on the beach", steps=args.steps, seed=1, width=args.side, height=args.side)

    # 1. warm latency, in process
    base = load_base(args.base_model, fresh=False)
    pipe = base.pipeline()
    direct = []
    for i in range(args.repeats + 2):
        t = time.perf_counter()
        with torch.inference_mode():
            pipe("a photo of a dog", num_inference_steps=args.steps, width=args.side, height=args.side, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(i))
        direct.append(time.perf_counter() - t)
    engine = ExpertEngine(str(reg.uri))
    info = ExpertInfo.read(reg.fetch("e00"))
    gi = GenItem(info.prompt(item["prompt"]), 1, args.steps, 7.5, 1, args.side, args.side)
    engine_warm = []
    for _ in range(args.repeats + 2):
        t = time.perf_counter()
        engine.generate("e00", "v0001", [gi])
        engine_warm.append(time.perf_counter() - t)

    # 2. cold swaps
    disk, host = [], []
    for sid in names[1:11]:
        t = time.perf_counter()
        engine.load(sid, "v0001")
        disk.append(time.perf_counter() - t)
    for sid in names[1:11]:
        engine.evict(sid, "v0001")
    for sid in names[1:11]:
        t = time.perf_counter()
        engine.load(sid, "v0001")
        host.append(time.perf_counter() - t)

    # 3. over HTTP
    connect_ray(None, num_cpus=os.cpu_count())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(registry=str(reg.uri), port=port, max_models_per_replica=8)
    start_serve("127.0.0.1", port)
    serve.run(build_app(cfg), name="dreamfleet", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}/v1/generate"
    client = httpx.Client(timeout=300)
    for _ in range(3):  # first request pays the replica's imports
        client.post(url, json={"subject": "e00", **item}).raise_for_status()
    http_warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        client.post(url, json={"subject": "e00", **item}).raise_for_status()
        http_warm.append(time.perf_counter() - t)

    def throughput(subjects: list[str]) -> dict[str, float]:
        codes: list[int] = []

        def one(i: int) -> float:
            t = time.perf_counter()
            r = httpx.post(url, json={"subject": subjects[i % len(subjects)], **item, "seed": i}, timeout=300)
            codes.append(r.status_code)
            return time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            lat = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - t0
        return {"requests": args.requests, "clients": args.clients, "wall_s": round(wall, 2),
                "req_per_s": round(args.requests / wall, 2), "p50_ms": round(statistics.median(lat) * 1000, 1),
                "p99_ms": round(sorted(lat)[int(0.99 * (len(lat) - 1))] * 1000, 1),
                "non_200": sum(c != 200 for c in codes)}

    one_expert = throughput(["e00"])
    twenty = throughput(names)
    state = client.get(f"http://127.0.0.1:{port}/v1/serving").json()
    serve.shutdown()

    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "command": " ".join(["python", *sys.argv]), "model": args.base_model, "side": args.side, "steps": args.steps,
        "warm": {"base_pipeline_direct": stats(direct[2:]), "engine_expert_active": stats(engine_warm[2:]),
                 "http_serve": stats(http_warm)},
        "warm_overhead_vs_direct_ms": round((statistics.median(http_warm) - statistics.median(direct[2:])) * 1000, 1),
        "swap": {"disk_load": stats(disk), "host_cache_load": stats(host)},
        "throughput": {"one_expert": one_expert, "twenty_experts_rotating": twenty},
        "replicas": state.get("replicas"), "cache": state.get("cache"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "replicas"}, indent=2))


if __name__ == "__main__":
    main()
