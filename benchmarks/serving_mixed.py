"""Mixed-subject batches and Serve's overhead at a realistic model size (issue 20).

    .venv/bin/python benchmarks/serving_mixed.py throughput --requests 120 --clients 8
    .venv/bin/python benchmarks/serving_mixed.py overhead --sides 64 128 --repeats 5

``throughput``: 20 tiny-random LoRA experts (one trained adapter, each perturbed by a seeded
amount, so every expert renders its own image). In process, the engine renders 8 requests
in one call: for one expert, for 8 experts in one mixed pass, and for 8 experts one pass each
(the engine without its LoRA bank: what serving did before). Over HTTP through Serve on an
embedded Ray: requests per second from concurrent clients, all for one expert vs spread over
the 20 experts in rotation (the replica's LRU holds 8).

``overhead``: an SD-1.5-sized base with random weights (trainer_vs_diffusers.py's ``sd15``,
1.07 B parameters) saved as a diffusers folder, a LoRA expert trained on it for one step, and
the same request three ways: the bare diffusers pipeline with ``load_lora_weights`` in this
process, the serving engine in this process, and ``POST /v1/generate`` through Serve. Warm
medians; overhead = Serve / bare pipeline - 1.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def med_ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "min_ms": round(min(xs) * 1000, 1),
            "max_ms": round(max(xs) * 1000, 1), "n": len(xs)}


def serve_registry(reg_uri: str, **cfg_kw) -> str:
    from helpers import free_port, wait_healthy
    from ray import serve

    from dreamfleet.control.cluster import connect_ray
    from dreamfleet.serving.app import build_app, start_serve
    from dreamfleet.serving.config import ServeConfig

    connect_ray(None, num_cpus=os.cpu_count())
    cfg = ServeConfig(registry=reg_uri, port=free_port(), rate_limit_per_min=1e6, rate_limit_burst=10_000, **cfg_kw)
    start_serve("127.0.0.1", cfg.port)
    serve.run(build_app(cfg), name="dreamfleet", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{cfg.port}"
    wait_healthy(url, 600)
    return url


def train_one(root: Path, base: str, side: int) -> Path:
    from helpers import fast_config, picture

    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    cfg = fast_config(steps=1 if base != "tiny-random" else 4, with_prior_preservation=base == "tiny-random",
                      resolution=side, learning_rate=5e-2)
    return train_subject(SubjectData("e00", "dog", [picture(i, (side, side)) for i in range(3)]), base, cfg,
                         root / "experts" / "e00", class_cache=ClassImageCache(root / "cache"),
                         progress=False).expert_dir


# --------------------------------------------------------------------------- throughput


def engine_passes(reg, names: list[str], steps: int, side: int, repeats: int) -> dict:
    from dreamfleet.serving.engine import ExpertEngine, GenItem, Job

    engine = ExpertEngine(str(reg.uri))
    item = GenItem("a photo of sks dog", 1, steps, 7.5, 1, side, side)
    out = {}
    for label, pick in (("one_expert", lambda r, j: names[0]), ("8_experts_mixed", lambda r, j: names[(r * 8 + j) % 20]),
                        ("8_experts_one_pass_each", lambda r, j: names[(r * 8 + j) % 20])):
        if label == "8_experts_one_pass_each":
            for entry in engine.host.values():
                entry.bank_pairs = None  # the engine without its bank: PEFT adapters, a pass per expert
            engine.banks = {k: type(b)(b.denoiser) for k, b in engine.banks.items()}
            engine.active.clear()
        times = []
        for r in range(repeats + 1):
            jobs = [Job(pick(r, j), "v0001", item) for j in range(8)]
            t = time.perf_counter()
            engine.generate_jobs(jobs)
            times.append(time.perf_counter() - t)
        out[label] = med_ms(times[1:])
    return out


def http_throughput(url: str, subjects: list[str], requests: int, clients: int, steps: int, side: int) -> dict:
    import httpx

    codes: list[int] = []

    def one(i: int) -> float:
        t = time.perf_counter()
        r = httpx.post(url + "/v1/generate", json={"subject": subjects[i % len(subjects)], "prompt": "a photo of {subject}",
                                                   "steps": steps, "seed": i, "width": side, "height": side}, timeout=600)
        codes.append(r.status_code)
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = sorted(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    return {"requests": requests, "clients": clients, "wall_s": round(wall, 2), "req_per_s": round(requests / wall, 3),
            "p50_ms": round(statistics.median(lat) * 1000, 1), "p99_ms": round(lat[int(0.99 * (len(lat) - 1))] * 1000, 1),
            "non_200": sum(c != 200 for c in codes)}


def throughput(args) -> dict:
    import httpx
    from helpers import perturbed

    from dreamfleet.registry import Registry

    root = Path(tempfile.mkdtemp(prefix="dreamfleet-mixed-"))
    src = train_one(root, "tiny-random", 32)
    reg = Registry(root / "reg")
    names = [f"e{i:02d}" for i in range(20)]
    for i, sid in enumerate(names):
        reg.publish(sid, perturbed(src, root / "x" / sid, sid, i))
    engine = engine_passes(reg, names, args.steps, args.side, args.repeats)
    url = serve_registry(str(reg.uri), max_models_per_replica=args.lru, max_batch_size=8)
    for sid in names[:3]:  # the replica's imports and first loads
        httpx.post(url + "/v1/generate", json={"subject": sid, "prompt": "a [V]", "steps": 1}, timeout=600)
    one = http_throughput(url, names[:1], args.requests, args.clients, args.steps, args.side)
    twenty = http_throughput(url, names, args.requests, args.clients, args.steps, args.side)
    state = httpx.get(url + "/v1/serving").json()
    return {"engine_8_requests_per_call": engine, "http": {"one_expert": one, "twenty_experts_rotating": twenty},
            "twenty_over_one_throughput": round(twenty["req_per_s"] / one["req_per_s"], 3),
            "replica_stats": [r["stats"] for r in state["replicas"].values()]}


# --------------------------------------------------------------------------- overhead at SD-1.5 size


def overhead(args) -> dict:
    import httpx
    import torch
    from diffusers import StableDiffusionPipeline
    from helpers import pipeline_images
    from trainer_vs_diffusers import sd15_base

    from dreamfleet.registry import Registry
    from dreamfleet.serving.engine import ExpertEngine, GenItem

    root = Path(tempfile.mkdtemp(prefix="dreamfleet-sd15-serve-"))
    folder = sd15_base().save_pretrained(root / "sd15")
    src = train_one(root, str(folder), 64)
    reg = Registry(root / "reg")
    reg.publish("e00", src)
    prompt = json.loads((src / "expert.json").read_text())["instance_prompt"]
    engine = ExpertEngine(str(reg.uri))
    bare = StableDiffusionPipeline.from_pretrained(folder)
    bare.scheduler = engine.base(str(folder)).pipeline().scheduler  # the sampler serving uses
    bare.load_lora_weights(str(src))
    url = serve_registry(str(reg.uri), min_side_fraction=0.125, max_batch_size=1)
    out = {}
    for side in args.sides:
        body = {"subject": "e00", "prompt": prompt, "steps": args.steps, "seed": 1, "width": side, "height": side}
        times = {"bare_pipeline": [], "engine": [], "http_serve": []}
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            pipeline_images(bare, [prompt], [1], args.steps, size=side)
            times["bare_pipeline"].append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.inference_mode():
                engine.generate("e00", "v0001", [GenItem(prompt, 1, args.steps, 7.5, 1, side, side)])
            times["engine"].append(time.perf_counter() - t)
            t = time.perf_counter()
            httpx.post(url + "/v1/generate", json=body, timeout=600).raise_for_status()
            times["http_serve"].append(time.perf_counter() - t)
        row = {k: med_ms(v[1:]) for k, v in times.items()}
        row["serve_overhead"] = round(row["http_serve"]["median_ms"] / row["bare_pipeline"]["median_ms"] - 1, 4)
        out[f"{side}px"] = row
    return {"model": "sd15-sized, random weights (1.07 B parameters)", "steps": args.steps, "by_side": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["throughput", "overhead"])
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--sides", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lru", type=int, default=8, help="experts per replica (the multiplexing LRU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = throughput(args) if args.what == "throughput" else overhead(args)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
              "command": " ".join(["python", *sys.argv]), **result}
    out = Path(args.out or f"benchmarks/results/serving_mixed_{args.what}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
