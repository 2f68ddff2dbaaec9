"""The toy judge: a small CNN trained on renders, the eyes of the toy metrics.

The world knows the truth of every render (class, context, colour, which subject), so a
classifier trained on renders can read those properties back from generated images. Its
heads: class (4), context (5), colour (6, ordinary objects only) and subject (one per toy
subject plus "none"). The "none" examples include ordinary objects and *distractors*:
two-colour designs that are not a subject (the right design in the wrong colours, the right
colours in the wrong design, another class), so the subject head must see the subject's
exact identity, not just "two colours". Renders are blurred, noised and colour-jittered in
training because generated images are softer than renders.

Trained by :func:`train_judge` (the project's training loop) and shipped in
``assets/toy-judge/`` (safetensors + ``judge.json``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dreamfleet.core.artifacts import atomic_dir, read_json, write_json
from dreamfleet.core.errors import ModelError
from dreamfleet.toy.subjects import SUBJECTS, random_subject_scene
from dreamfleet.toy.world import (
    CLASSES,
    COLOURS,
    CONTEXTS,
    DESIGNS,
    Scene,
    place,
    random_scene,
    render,
    scene_rng,
)

JUDGE_DIR = Path(__file__).resolve().parent / "assets" / "toy-judge"
NONE = "none"
IGNORE = -100


class JudgeNet(nn.Module):
    def __init__(self, n_subjects: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
            )

        self.features = nn.Sequential(
            block(3, width), nn.AvgPool2d(2), block(width, 2 * width), nn.AvgPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        dim = 4 * width
        self.embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU())
        self.heads = nn.ModuleDict({
            "cls": nn.Linear(dim, len(CLASSES)),
            "context": nn.Linear(dim, len(CONTEXTS)),
            "colour": nn.Linear(dim, len(COLOURS)),
            "subject": nn.Linear(dim, n_subjects + 1),
        })

    def forward(self, x_bchw: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(embedding, logits per head) of images in [-1, 1]."""
        e = self.embed(self.features(x_bchw))
        return e, {k: h(e) for k, h in self.heads.items()}


@dataclass
class JudgeConfig:
    seed: int = 0
    steps: int = 1800
    batch_size: int = 96
    learning_rate: float = 2e-3
    pool_size: int = 12000
    subject_share: float = 0.3
    distractor_share: float = 0.25
    width: int = 32


def subject_labels() -> list[str]:
    return [s.subject_id for s in SUBJECTS] + [NONE]


def distractor_scene(rng: random.Random) -> Scene:
    """A two-colour design that is not any subject's: near misses of the subjects, and random ones."""
    taken = {(s.cls, s.design, s.colour, s.colour2) for s in SUBJECTS}
    while True:
        s = rng.choice(SUBJECTS)
        kind = rng.random()
        colours = list(COLOURS)
        if kind < 0.3:  # the subject's design, other colours (or the colours swapped)
            c1, c2 = (s.colour2, s.colour) if rng.random() < 0.3 else tuple(rng.sample(colours, 2))
            cand = (s.cls, s.design, c1, c2)
        elif kind < 0.6:  # the subject's colours, another design
            cand = (s.cls, rng.choice([d for d in DESIGNS if d != s.design]), s.colour, s.colour2)
        elif kind < 0.75:  # the subject's design and colours on another class
            cand = (rng.choice([c for c in CLASSES if c != s.cls]), s.design, s.colour, s.colour2)
        else:
            cand = (rng.choice(CLASSES), rng.choice(DESIGNS), *rng.sample(colours, 2))
        if cand not in taken:
            scene = Scene(cls=cand[0], colour=cand[2], pattern="solid", context=rng.choice(CONTEXTS),
                          size=rng.choice(("small", "large")), design=cand[1], colour2=cand[3])
            return place(scene, rng)


def labelled_scene(seed: int, index: int, c: JudgeConfig) -> tuple[Scene, dict[str, int]]:
    rng = scene_rng(seed, index, stream=11)
    u = rng.random()
    if u < c.subject_share:
        k = rng.randrange(len(SUBJECTS))
        scene = random_subject_scene(SUBJECTS[k], rng)
        subject, colour = k, IGNORE
    elif u < c.subject_share + c.distractor_share:
        scene = distractor_scene(rng)
        subject, colour = len(SUBJECTS), IGNORE
    else:
        scene = random_scene(rng)
        subject, colour = len(SUBJECTS), list(COLOURS).index(scene.colour)
    labels = {"cls": CLASSES.index(scene.cls), "context": CONTEXTS.index(scene.context), "colour": colour,
              "subject": subject}
    return scene, labels


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def degrade(x_bchw: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur, resampling, noise and colour jitter: renders made to look like samples
    of a small diffusion model (soft edges, muddied colours, darker or paler backgrounds)."""
    b = x_bchw.shape[0]
    side = x_bchw.shape[-1]
    low = F.interpolate(F.interpolate(x_bchw, size=side * 5 // 8, mode="bilinear", antialias=True),
                        size=side, mode="bilinear")
    use_low = (torch.rand(b, 1, 1, 1, generator=g) < 0.3).float()
    x_bchw = use_low * low + (1 - use_low) * x_bchw
    sigma = torch.rand(b, generator=g) * 1.6
    r = torch.arange(-2, 3, dtype=torch.float32)
    out = []
    for i in range(b):
        s = float(sigma[i])
        if s < 0.2:
            out.append(x_bchw[i])
            continue
        k = torch.exp(-(r**2) / (2 * s * s))
        k = k / k.sum()
        img = x_bchw[i:i + 1].permute(1, 0, 2, 3)  # (3, 1, H, W): channels as the batch
        img = F.conv2d(F.pad(img, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
        img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))
        out.append(img.permute(1, 0, 2, 3)[0])
    x = torch.stack(out)
    # Saturation towards grey, per-channel gain and shift, noise.
    sat = 1 - torch.rand(b, 1, 1, 1, generator=g) * 0.35
    x = x.mean(1, keepdim=True) + sat * (x - x.mean(1, keepdim=True))
    gain = 1 + (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.3
    shift = (torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.3
    noise = torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * 0.12)
    return (x * gain + shift + noise).clamp(-1, 1)


class JudgeObjective:
    def __init__(self, net: JudgeNet, c: JudgeConfig):
        self.net, self.c = net, c
        scenes = [labelled_scene(c.seed, i, c) for i in range(c.pool_size)]
        self.x_bchw = to_tensor([render(s) for s, _ in scenes])
        self.labels = {k: torch.tensor([lab[k] for _, lab in scenes]) for k in ("cls", "context", "colour", "subject")}

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"judge": self.net}

    def loss(self, step: int, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        from dreamfleet.trainers.loop import step_generator

        g = step_generator(self.c.seed, step, stream=micro_step)
        idx = torch.randint(len(self.x_bchw), (self.c.batch_size,), generator=g)
        _, logits = self.net(degrade(self.x_bchw[idx], g))
        losses = {k: F.cross_entropy(logits[k], self.labels[k][idx], ignore_index=IGNORE) for k in logits}
        loss = sum(losses.values())
        return loss, {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in losses.items()}}


def train_judge(out: str | Path = JUDGE_DIR, c: JudgeConfig | None = None, *,
                validate: Callable[[ToyJudge], dict], overwrite: bool = True) -> dict:
    """Train the judge on renders and write it (weights + judge.json with ``validate``'s
    held-out report, e.g. ``dreamfleet.toy.metrics.validate_judge``) to ``out``."""
    from safetensors.torch import save_file

    from dreamfleet.trainers.config import LoopConfig, OptimizerConfig
    from dreamfleet.trainers.loop import LoopSettings, run_loop

    c = c or JudgeConfig()
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)
    net = JudgeNet(len(SUBJECTS), c.width)
    objective = JudgeObjective(net, c)
    optimizer = OptimizerConfig(learning_rate=c.learning_rate, lr_scheduler="cosine",
                                lr_warmup_steps=min(100, c.steps // 10))
    loop = LoopConfig(steps=c.steps, checkpoint_every=0, validation_every=0)
    result = run_loop(objective, LoopSettings(optimizer, loop, progress=False, description="toy judge"))
    net.eval()
    report = validate(ToyJudge(net))
    info = {"config": asdict(c), "subjects": subject_labels(), "final_loss": result.final_loss,
            "steps": result.final_step, "wall_time_s": round(time.perf_counter() - t0, 1), "validation": report}
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / "judge.safetensors"))
        write_json(tmp / "judge.json", info)
    return info


class ToyJudge:
    """The trained judge: probabilities of class, context, colour and subject for images."""

    def __init__(self, net: JudgeNet, subjects: list[str] | None = None):
        self.net = net.eval()
        self.subjects = subjects or subject_labels()

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ToyJudge:
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else JUDGE_DIR
        if not (folder / "judge.safetensors").is_file():
            raise ModelError(f"no toy judge at {folder}; train it with `dreamfleet toy judge --out {folder}`")
        info = read_json(folder / "judge.json")
        net = JudgeNet(len(info["subjects"]) - 1, info["config"]["width"])
        net.load_state_dict(load_file(str(folder / "judge.safetensors")))
        return cls(net, info["subjects"])

    @torch.no_grad()
    def predict(self, images) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(embeddings (N, D), probabilities per head (N, K)) of PIL images."""
        embs, probs = [], {}
        for i in range(0, len(images), 256):
            e, logits = self.net(to_tensor(images[i:i + 256]))
            embs.append(e)
            for k, v in logits.items():
                probs.setdefault(k, []).append(v.softmax(-1))
        return torch.cat(embs), {k: torch.cat(v) for k, v in probs.items()}
