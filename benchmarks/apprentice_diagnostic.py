"""Does the apprentice read its demonstrations? The demonstration gap, and a quick held-out evaluation.

``train`` trains an apprentice in process (no Ray) on a demonstration set -- an existing one
(``--set``, e.g. the toy bench's ``demo-set``) or ground-truth renders of ``--subjects``
procedural toy subjects in new contexts -- and logs, every ``--eval-every`` steps, the
*demonstration gap*: the denoising loss on ground-truth renders of the eight held-out named
subjects (new contexts, fixed noise and timesteps 200-900) with another subject's
demonstrations minus the loss with the subject's own. Zero means the demonstrations are
ignored; the loss with no demonstrations (zero latents) is logged too. ``evaluate`` generates
the held-out subjects' six prompts (2 images each) and prints the toy metrics.

    .venv/bin/python benchmarks/apprentice_diagnostic.py train --out runs/diag/gt --subjects 256 --lr 3e-3 --steps 4000
    .venv/bin/python benchmarks/apprentice_diagnostic.py train --out runs/diag/hybrid \\
        --set runs/apprentice/demo-set --photo-targets 0.5 --lr 3e-3 --steps 4000
    .venv/bin/python benchmarks/apprentice_diagnostic.py evaluate --out runs/diag/gt
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamfleet.core.apprentice import Apprentice, encode_demos, pixels
from dreamfleet.core.identifiers import choose_identifier
from dreamfleet.core.models import load_base
from dreamfleet.data.demos import DemoSubject, Target, write_demo_set
from dreamfleet.toy.subjects import (
    EVAL_PROMPTS,
    SUBJECTS,
    procedural_subjects,
    subject_images,
    subject_scenes,
)
from dreamfleet.toy.world import CONTEXT_PHRASES, render
from dreamfleet.trainers.apprentice import ApprenticeConfig, ApprenticeObjective, prepare_apprentice

METRICS = ("subject_fidelity", "subject_similarity", "prompt_fidelity")


def ground_truth(s, n_targets: int) -> DemoSubject:
    """The subject's photos as demonstrations, the toy world's renders of it in new contexts as targets."""
    scenes = subject_scenes(s, n_targets, stream=5)
    targets = [Target(render(sc), "a {0} {1} " + CONTEXT_PHRASES[sc.context], {"gain": 1.0}) for sc in scenes]
    return DemoSubject(s.subject_id, s.cls, subject_images(s, 4), targets)


class DemoGap:
    """Held-out denoising loss with own / another subject's / no demonstrations, on fixed noise."""

    def __init__(self, p, subjects, repeats: int = 4):
        base, self.p, self.repeats = p.base, p, repeats
        self.data = []
        for s in subjects:
            d = ground_truth(s, 4)
            x = torch.stack([pixels(t.image, base.resolution) for t in d.targets])
            prompts = [" ".join(t.template.format(p.identifier, s.cls).split()) for t in d.targets]
            ids = base.tokenizer(prompts, padding="max_length", max_length=base.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                lat = base.vae.encode(x).latent_dist.mean * base.vae.config.scaling_factor
                emb = base.text_encoder(ids)[0]
            self.data.append((encode_demos(base.vae, d.demos, base.resolution), lat, emb))
        g = torch.Generator().manual_seed(123)
        shape, slots = self.data[0][1].shape, max(16, len(self.data))
        self.noise = [torch.randn(repeats, *shape, generator=g) for _ in range(slots)]
        self.t = [torch.randint(200, 900, (repeats, shape[0]), generator=g) for _ in range(slots)]

    @torch.no_grad()
    def __call__(self) -> dict[str, float]:
        unet, sched, n = self.p.base.unet, self.p.base.noise_scheduler, len(self.data)
        total = {"own": 0.0, "other": 0.0, "none": 0.0}
        for i, (demos, lat, emb) in enumerate(self.data):
            for r in range(self.repeats):
                noisy = sched.add_noise(lat, self.noise[i][r], self.t[i][r])
                for key, d in (("own", demos), ("other", self.data[(i + 1) % n][0]), ("none", torch.zeros_like(demos))):
                    e = d.unsqueeze(0).expand(lat.shape[0], -1, -1)
                    pred = unet(noisy, self.t[i][r], emb, added_cond_kwargs={"image_embeds": [e]}).sample
                    total[key] += F.mse_loss(pred, self.noise[i][r]).item() / (n * self.repeats)
        return {**total, "gap": total["other"] - total["own"]}


def train(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.set) if args.set else out / "set"
    if not args.set and not (data / "index.parquet").exists():
        write_demo_set([ground_truth(s, args.targets) for s in procedural_subjects(args.subjects)], data,
                       builder={"kind": "ground-truth renders"}, overwrite=True)
    c = ApprenticeConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, device="cpu",
                         photo_targets=args.photo_targets, lr_warmup_steps=50, checkpoint_every=0)
    p = prepare_apprentice(data, "toy", c)
    objective, unet = ApprenticeObjective(p), p.base.unet
    gap = DemoGap(p, SUBJECTS)
    params = [q for q in unet.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=c.adam_weight_decay)
    log, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            unet.eval()
            log.append({"step": step, "s": round(time.time() - t0), **{k: round(v, 6) for k, v in gap().items()}})
            print(json.dumps(log[-1]), flush=True)
            unet.train()
        if step == args.steps:
            break
        for group in opt.param_groups:  # linear warm-up, cosine decay (the trainer's schedule)
            group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        loss, _ = objective.loss(step, 0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)
        opt.step()
    (out / "demo_gap.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    torch.save(unet.state_dict(), out / "unet.pt")


def evaluate(args) -> None:
    from dreamfleet.eval.evaluate import EvalConfig, Scorers, SubjectCase, evaluate_case
    from dreamfleet.toy.judge import ToyJudge

    base = load_base("toy", fresh=True)
    ident = choose_identifier(base.tokenizer, "apprentice")  # what prepare_apprentice chose
    app = Apprentice.fresh(base, identifier=ident)
    base.unet.load_state_dict(torch.load(Path(args.out) / "unet.pt"))
    base.unet.eval()
    ec = EvalConfig(images_per_prompt=2, seed=0)
    scorers, rows = Scorers.from_config(ec, judge=ToyJudge.load()), []
    for s in SUBJECTS:
        photos = subject_images(s, 5)
        case = SubjectCase(s.subject_id, s.cls, ident, list(EVAL_PROMPTS), photos, label="apprentice")
        rows.append(evaluate_case(app.bind(photos), case, scorers, ec, grid_path=Path(args.out) / "grids" / f"{s.subject_id}.png"))
        print(s.subject_id, {k: round(rows[-1][k], 3) for k in METRICS}, flush=True)
    print("mean", json.dumps({k: round(statistics.mean(r[k] for r in rows), 4) for k in METRICS}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--set", help="a demonstration set (default: ground-truth renders of --subjects subjects)")
    t.add_argument("--subjects", type=int, default=256)
    t.add_argument("--targets", type=int, default=4, help="ground-truth renders per subject")
    t.add_argument("--photo-targets", type=float, default=0.0)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--eval-every", type=int, default=500)
    e = sub.add_parser("evaluate")
    e.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train(args) if args.cmd == "train" else evaluate(args)


if __name__ == "__main__":
    main()
