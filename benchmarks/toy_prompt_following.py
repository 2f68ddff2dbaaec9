"""How well the toy base models follow prompts, read by the toy judge (docs/toy_world.md).

The 8 sample prompts of the toy model's record (classes, colours, patterns, contexts), 6
samples each with fixed noise seeds, 25 steps, guidance 4: the judge's probability and
top-choice accuracy of the prompted class, context and colour, and prompt fidelity (mean of
p(class) and p(context), the microbench's measure)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/toy_prompt_following.py --base-model toy toy-flux
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-model", nargs="+", default=["toy", "toy-flux"])
    p.add_argument("--per-prompt", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from dreamfleet.core.models import load_base
    from dreamfleet.toy.judge import ToyJudge
    from dreamfleet.toy.metrics import prompt_following
    from dreamfleet.toy.pretrain import SAMPLE_PROMPTS, sample_images

    judge = ToyJudge.load()
    for spec in a.base_model:
        t0 = time.perf_counter()
        images = sample_images(load_base(spec), SAMPLE_PROMPTS, per_prompt=a.per_prompt, seed=a.seed)
        scores = {k: round(v, 3) for k, v in prompt_following(judge, images).items()}
        print(json.dumps({"base_model": spec, **scores, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
