"""The toy world: a procedural renderer of small captioned images.

A scene is one object (a class, a colour, a pattern, a size, a position) in one context
(a background: grass, snow, beach, night, rug). :func:`render` draws it with PIL at 4x and
downsamples, so edges are anti-aliased; :func:`caption` describes it in words the shared
tiny tokenizer knows as single tokens ("a small red striped ball on the beach").
:func:`world_sample` gives the scene and caption number ``index`` of a seeded, unlimited
stream, so any image of the stream can be re-rendered alone.

Subjects (see :mod:`dreamfleet.toy.subjects`) are objects with a two-colour *design*
(halves, a cross, a ring...) that ordinary scenes never carry: ordinary objects have one
colour and a white pattern. The base model therefore cannot draw a subject from text alone.
This module is bottom-layer: numpy and PIL only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("ball", "box", "kite", "cup")
CONTEXTS = ("grass", "snow", "beach", "night", "rug")
CONTEXT_PHRASES = {
    "grass": "on the grass",
    "snow": "in the snow",
    "beach": "on the beach",
    "night": "at night",
    "rug": "on a rug",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 70, 230),
    "yellow": (250, 215, 20),
    "purple": (140, 40, 190),
    "orange": (250, 130, 10),
    "pink": (255, 120, 190),
}
PATTERNS = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "large")
# Designs of subjects only: two colours laid out in a way no ordinary object is.
DESIGNS = ("halves", "cross", "ring", "quarters", "diagonal", "band")

PATTERN_INK = (250, 250, 250)  # ordinary patterns are always white on the object colour
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One object in one context. Geometry is in fractions of the image side."""

    cls: str
    colour: str
    pattern: str
    context: str
    size: str = "large"
    x: float = 0.5
    y: float = 0.55
    scale: float = 0.5
    design: str | None = None
    colour2: str | None = None
    texture_seed: int = 0

    def __post_init__(self) -> None:
        checks = (("class", self.cls, CLASSES), ("colour", self.colour, COLOURS), ("pattern", self.pattern, PATTERNS),
                  ("context", self.context, CONTEXTS), ("size", self.size, SIZES))
        for what, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; one of {', '.join(allowed)}")
        if self.design is not None and (self.design not in DESIGNS or self.colour2 not in COLOURS):
            raise ValueError(f"a design needs one of {', '.join(DESIGNS)} and a second colour, got {self.design!r}/{self.colour2!r}")


# --------------------------------------------------------------------------- sampling


def scale_for(size: str, rng: random.Random) -> float:
    return rng.uniform(0.38, 0.44) if size == "small" else rng.uniform(0.54, 0.64)


def place(scene: Scene, rng: random.Random) -> Scene:
    """A random size-consistent scale and a position that keeps the object inside the image."""
    scale = scale_for(scene.size, rng)
    half = scale / 2
    return replace(scene, scale=scale, x=rng.uniform(half + 0.04, 1 - half - 0.04),
                   y=rng.uniform(half + 0.04, 1 - half - 0.04), texture_seed=rng.randrange(2**31))


def random_scene(rng: random.Random) -> Scene:
    scene = Scene(
        cls=rng.choice(CLASSES), colour=rng.choice(list(COLOURS)), pattern=rng.choice(PATTERNS),
        context=rng.choice(CONTEXTS), size=rng.choice(SIZES),
    )
    return place(scene, rng)


def caption(scene: Scene, rng: random.Random | None = None, *, keep: float = 1.0) -> str:
    """'a [size] [colour] [pattern] class [context]'; each attribute is kept with probability ``keep``."""
    rng = rng or random.Random(0)
    words = ["a"]
    if scene.size == "small" and rng.random() < keep:
        words.append("small")
    if rng.random() < keep:
        words.append(scene.colour)
    if scene.pattern != "solid" and rng.random() < keep:
        words.append(scene.pattern)
    words.append(scene.cls)
    if rng.random() < keep:
        words.append(CONTEXT_PHRASES[scene.context])
    return " ".join(words)


def scene_rng(seed: int, index: int, stream: int = 0) -> random.Random:
    return random.Random((seed * 1_000_003 + index * 7_919 + stream * 104_729) % (2**63))


def world_sample(seed: int, index: int, *, size: int = 32, keep: float = 0.85) -> tuple[Image.Image, str, Scene]:
    """Image, caption and scene number ``index`` of the world stream ``seed`` (unlimited, deterministic)."""
    rng = scene_rng(seed, index)
    scene = random_scene(rng)
    return render(scene, size), caption(scene, rng, keep=keep), scene


# --------------------------------------------------------------------------- drawing


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * f))) for c in rgb)


def draw_context(context: str, side: int, rng: random.Random) -> Image.Image:
    """The background of ``context`` at ``side`` px, with a random texture."""
    img = Image.new("RGB", (side, side))
    d = ImageDraw.Draw(img)
    u = side / 32  # one output pixel
    if context == "grass":
        d.rectangle((0, 0, side, side), fill=(70, 160, 60))
        for _ in range(60):
            x, y = rng.uniform(0, side), rng.uniform(0, side)
            d.line((x, y, x + rng.uniform(-u, u), y - 2.5 * u), fill=(40, 115, 35), width=max(1, round(u / 2)))
    elif context == "snow":
        d.rectangle((0, 0, side, side * 0.3), fill=(185, 205, 230))
        d.rectangle((0, side * 0.3, side, side), fill=(245, 247, 252))
        for _ in range(25):
            x, y = rng.uniform(0, side), rng.uniform(side * 0.3, side)
            d.ellipse((x, y, x + 0.6 * u, y + 0.6 * u), fill=(200, 210, 228))
    elif context == "beach":
        d.rectangle((0, 0, side, side * 0.38), fill=(40, 130, 210))
        d.rectangle((0, side * 0.38, side, side), fill=(235, 205, 140))
        for _ in range(3):
            y = rng.uniform(0.05, 0.32) * side
            d.line((0, y, side, y), fill=(120, 180, 235), width=max(1, round(u / 2)))
    elif context == "night":
        d.rectangle((0, 0, side, side), fill=(15, 18, 50))
        for _ in range(14):
            x, y = rng.uniform(0, side), rng.uniform(0, side)
            d.ellipse((x, y, x + 0.7 * u, y + 0.7 * u), fill=(240, 240, 200))
    elif context == "rug":
        d.rectangle((0, 0, side, side), fill=(120, 35, 40))
        step = side / 5
        off = rng.uniform(0, step)
        for i in range(-6, 7):
            x = off + i * step
            d.line((x, 0, x + side, side), fill=(205, 160, 60), width=max(1, round(u / 2)))
            d.line((x + side, 0, x, side), fill=(205, 160, 60), width=max(1, round(u / 2)))
    return img


def object_mask(cls: str, box: tuple[float, float, float, float], side: int) -> Image.Image:
    """The object's silhouette (L mode, 255 inside) for a bounding box (x0, y0, x1, y1)."""
    m = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(m)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if cls == "ball":
        d.ellipse(box, fill=255)
    elif cls == "box":
        d.rectangle((x0 + 0.08 * w, y0 + 0.08 * h, x1 - 0.08 * w, y1 - 0.08 * h), fill=255)
    elif cls == "kite":
        cx = x0 + w / 2
        d.polygon([(cx, y0), (x1 - 0.1 * w, y0 + 0.38 * h), (cx, y1 - 0.12 * h), (x0 + 0.1 * w, y0 + 0.38 * h)], fill=255)
    elif cls == "cup":
        d.polygon([(x0, y0 + 0.12 * h), (x1 - 0.25 * w, y0 + 0.12 * h), (x1 - 0.35 * w, y1), (x0 + 0.1 * w, y1)], fill=255)
    return m


def _decor(cls: str, box: tuple[float, float, float, float], d: ImageDraw.ImageDraw, ink: tuple[int, int, int], u: float) -> None:
    """Class parts outside the fill: the kite's tail, the cup's handle."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    lw = max(1, round(0.9 * u))
    if cls == "kite":
        cx, top = x0 + w / 2, y1 - 0.12 * h
        pts = [(cx, top), (cx - 0.12 * w, top + 0.06 * h), (cx + 0.06 * w, top + 0.1 * h), (cx - 0.04 * w, y1 + 0.02 * h)]
        d.line(pts, fill=ink, width=lw)
    elif cls == "cup":
        d.ellipse((x1 - 0.42 * w, y0 + 0.3 * h, x1 - 0.02 * w, y0 + 0.72 * h), outline=ink, width=max(1, round(1.3 * u)))


def fill_layer(scene: Scene, box: tuple[float, float, float, float], side: int) -> Image.Image:
    """The object's surface: its colour with its pattern, or its two-colour design."""
    base = COLOURS[scene.colour]
    img = Image.new("RGB", (side, side), base)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2
    if scene.design is not None:
        c2 = COLOURS[scene.colour2]
        if scene.design == "halves":  # left half colour, right half colour2
            d.rectangle((cx, 0, side, side), fill=c2)
        elif scene.design == "cross":  # a thick plus sign
            d.rectangle((cx - 0.13 * w, 0, cx + 0.13 * w, side), fill=c2)
            d.rectangle((0, cy - 0.13 * h, side, cy + 0.13 * h), fill=c2)
        elif scene.design == "ring":  # a thick ring around a core of the first colour
            d.ellipse((cx - 0.36 * w, cy - 0.36 * h, cx + 0.36 * w, cy + 0.36 * h), fill=c2)
            d.ellipse((cx - 0.18 * w, cy - 0.18 * h, cx + 0.18 * w, cy + 0.18 * h), fill=base)
        elif scene.design == "quarters":  # 2x2 blocks
            d.rectangle((cx, 0, side, cy), fill=c2)
            d.rectangle((0, cy, cx, side), fill=c2)
        elif scene.design == "diagonal":  # upper-left triangle colour, lower-right colour2
            d.polygon([(x1 + w, y0 - h), (x1 + w, y1 + h), (x0 - w, y1 + h)], fill=c2)
        elif scene.design == "band":  # one thick horizontal band
            d.rectangle((0, cy - 0.17 * h, side, cy + 0.17 * h), fill=c2)
        return img
    period = max(w, h) / 4.5
    if scene.pattern == "striped":
        y = y0 + period / 2
        while y < y1:
            d.rectangle((0, y, side, y + period / 2), fill=PATTERN_INK)
            y += period
    elif scene.pattern == "dotted":
        r = period * 0.28
        for i in range(-1, 6):
            for j in range(-1, 6):
                px = x0 + (i + 0.5 + 0.5 * (j % 2)) * period
                py = y0 + (j + 0.5) * period
                d.ellipse((px - r, py - r, px + r, py + r), fill=PATTERN_INK)
    elif scene.pattern == "checkered":
        cell = period / 1.5 * 1.5
        for i in range(0, int(w / cell) + 2):
            for j in range(0, int(h / cell) + 2):
                if (i + j) % 2 == 0:
                    d.rectangle((x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell), fill=PATTERN_INK)
    return img


def render(scene: Scene, size: int = 32) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image (deterministic)."""
    side = size * SUPERSAMPLE
    rng = random.Random(scene.texture_seed)
    img = draw_context(scene.context, side, rng)
    half = scene.scale * side / 2
    cx, cy = scene.x * side, scene.y * side
    box = (cx - half, cy - half, cx + half, cy + half)
    outline = _shade(COLOURS[scene.colour], 0.45)
    _decor(scene.cls, box, ImageDraw.Draw(img), outline if scene.cls == "cup" else (235, 235, 235), side / 32)
    mask = object_mask(scene.cls, box, side)
    img.paste(fill_layer(scene, box, side), (0, 0), mask)
    # A dark rim: the silhouette minus its erosion, so shapes read against any background.
    rim = mask.filter(ImageFilter.MinFilter(2 * (SUPERSAMPLE // 2) + 1))
    edge = Image.composite(Image.new("L", mask.size, 0), mask, rim)
    img.paste(Image.new("RGB", img.size, outline), (0, 0), edge)
    return img.resize((size, size), Image.Resampling.LANCZOS)
