"""The sweep behind the toy Flux's microbench recipe (docs/microbench.md).

Each recipe (``LR:STEPS:RANK[:PRIOR_WEIGHT]``, LoRA on the transformer, λ 1 by default) runs the microbench on a few toy
subjects from the shipped ``toy-flux``: the base model, DreamBooth without and with prior
preservation, the same seeds, prompts and metrics as the full table. One line of JSON per
recipe and model; ``--report`` prints the markdown table of every recipe run so far::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy_flux_sweep.py --out runs/flux-sweep \\
        --recipes 3e-4:800:16 1e-3:800:16 3e-3:800:16 --subjects ball-halves,box-quarters
    .venv/bin/python benchmarks/toy_flux_sweep.py --out runs/flux-sweep --report
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

METRICS = ("subject_fidelity", "subject_similarity", "prompt_fidelity", "prompt_fidelity_novel", "class_drift")


def run(a: argparse.Namespace) -> None:
    from dreamfleet.eval.microbench import MicrobenchConfig, run_microbench, summarise

    for recipe in a.recipes:
        lr, steps, rank, *weight = recipe.split(":")
        train = {"learning_rate": float(lr), "steps": int(steps), "lora_rank": int(rank),
                 "prior_loss_weight": float(weight[0]) if weight else 1.0}
        out = Path(a.out) / recipe.replace(":", "_")
        c = MicrobenchConfig(subjects=a.subjects.split(","), train=train)
        summary = summarise(run_microbench(out, c, base_spec=a.base_model))
        (out / "summary.json").write_text(json.dumps({"recipe": train, "summary": summary}, indent=1))
        for label, metrics in summary.items():
            print(json.dumps({"recipe": recipe, "model": label, **{k: round(v, 3) for k, v in metrics.items()}}))


def report(a: argparse.Namespace) -> None:
    print("| recipe (lr, steps, rank, λ) | model | " + " | ".join(METRICS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in METRICS) + " |")
    for path in sorted(Path(a.out).glob("*/summary.json")):
        data = json.loads(path.read_text())
        r = data["recipe"]
        for label, m in data["summary"].items():
            cells = " | ".join(f"{m[k]:.3f}" if k in m else "" for k in METRICS)
            weight = r.get("prior_loss_weight", 1.0)
            print(f"| {r['learning_rate']:g}, {r['steps']}, {r['lora_rank']}, {weight:g} | {label} | {cells} |")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--recipes", nargs="*", default=["1e-3:800:16"])
    p.add_argument("--subjects", default="ball-halves,box-quarters")
    p.add_argument("--base-model", default="toy-flux")
    p.add_argument("--report", action="store_true", help="print the table of the recipes run so far")
    a = p.parse_args()
    report(a) if a.report else run(a)


if __name__ == "__main__":
    main()
