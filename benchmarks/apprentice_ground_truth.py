"""Diagnostic for docs/apprentice.md: can the apprentice read demonstrations when its targets are clean?

Trains an apprentice on ground-truth renders (each procedural training subject drawn by the toy
world in 4 new contexts, the caption as prompt) instead of expert renders, and writes the
apprentice folder; evaluate it like any apprentice (see docs/apprentice.md).

    .venv/bin/python benchmarks/apprentice_ground_truth.py --out runs/apprentice-gt --lr 1e-3 --steps 600
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from dreamfleet.data.demos import DemoSubject, Target, write_demo_set
from dreamfleet.toy.subjects import procedural_subjects, subject_images, subject_scenes
from dreamfleet.toy.world import CONTEXT_PHRASES, render
from dreamfleet.trainers.apprentice import ApprenticeConfig, train_apprentice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    subjects = []
    for s in procedural_subjects(args.subjects):  # the same training subjects as `dreamfleet toy apprentice`
        scenes = subject_scenes(s, 4, stream=5)
        targets = [Target(render(sc), "a {0} {1} " + CONTEXT_PHRASES[sc.context], {"gain": 1.0}) for sc in scenes]
        subjects.append(DemoSubject(s.subject_id, s.cls, subject_images(s, 4), targets))
    write_demo_set(subjects, args.out + "-set", builder={"kind": "ground-truth renders"}, overwrite=True)
    t0 = time.time()
    c = ApprenticeConfig(steps=args.steps, batch_size=16, learning_rate=args.lr, checkpoint_every=0,
                         lr_warmup_steps=50, device="cpu")
    info = train_apprentice(args.out + "-set", "toy", c, args.out, overwrite=True, progress=False)
    print(f"apprentice {args.out}: final loss {info.final_loss:.4f} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
