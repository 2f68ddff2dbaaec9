"""Small builders shared by the tests (pictures, subjects, fast configs)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure (a coloured disc on a gradient), not pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)[None, None, :]
    arr = np.broadcast_to(base, (h, w, 3)).astype(np.uint8).copy()
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), min(w, h) // 4
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img.convert(mode) if mode != "RGB" else img


def subject_folder(root: Path, name: str = "dog1", n: int = 4, seed: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        picture(seed * 100 + i).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


def fast_config(**overrides):
    """A TrainConfig small enough for a CPU test: few steps, few class images, 2 denoising steps."""
    from dreamfleet.trainers.config import TrainConfig

    kw = dict(
        steps=8, num_class_images=4, class_generation_steps=2, validation_inference_steps=2,
        num_validation_images=1, validation_prompts=["a {identifier} {class_noun}"],
        checkpoint_every=0, validation_every=0, learning_rate=1e-3,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
