"""The toy subjects: specific objects that the toy base model cannot draw from text alone.

Each subject is an object of an ordinary class whose surface carries a two-colour design
(halves, a cross, a ring...) that no pretraining scene has: ordinary objects are one colour
with a white pattern. Several subjects share a class (three balls, two boxes, two cups), so
the class-image cache is shared between them. :func:`subject_images` renders a subject's
photos (varied positions, sizes and contexts; deterministic) and :func:`write_subjects_manifest`
writes them as a manifest in the project's format.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dreamfleet.toy.world import CONTEXTS, SIZES, Scene, place, render, scene_rng


@dataclass(frozen=True)
class ToySubject:
    subject_id: str
    cls: str
    colour: str
    colour2: str
    design: str

    def scene(self, context: str, size: str = "large") -> Scene:
        return Scene(cls=self.cls, colour=self.colour, pattern="solid", context=context, size=size,
                     design=self.design, colour2=self.colour2)

    @property
    def description(self) -> str:
        return f"{self.cls} with a {self.design} design in {self.colour} and {self.colour2}"


SUBJECTS: tuple[ToySubject, ...] = (
    ToySubject("ball-halves", "ball", "red", "blue", "halves"),
    ToySubject("ball-ring", "ball", "yellow", "purple", "ring"),
    ToySubject("ball-cross", "ball", "blue", "orange", "cross"),
    ToySubject("box-quarters", "box", "pink", "blue", "quarters"),
    ToySubject("box-diagonal", "box", "yellow", "red", "diagonal"),
    ToySubject("cup-band", "cup", "purple", "yellow", "band"),
    ToySubject("cup-quarters", "cup", "orange", "blue", "quarters"),
    ToySubject("kite-cross", "kite", "red", "yellow", "cross"),
)
SUBJECTS_BY_ID = {s.subject_id: s for s in SUBJECTS}

# DreamBench-style evaluation prompts ('{0}': identifier, '{1}': class noun).
EVAL_PROMPTS = (
    "a {0} {1}",
    "a {0} {1} on the grass",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} at night",
    "a {0} {1} on a rug",
)
SUBJECT_SEED = 6  # the issue number: the photos of every subject come from this stream


def procedural_subjects(n: int, *, seed: int = 7, exclude: tuple[ToySubject, ...] = SUBJECTS) -> list[ToySubject]:
    """``n`` distinct random subjects (class, design, two colours) for training the apprentice.

    None of them is one of ``exclude`` (by default the eight named subjects, the held-out
    evaluation set), in either colour order, so evaluation subjects stay unseen.
    """
    from dreamfleet.toy.world import CLASSES, COLOURS, DESIGNS

    taken = {(s.cls, s.design, frozenset((s.colour, s.colour2))) for s in exclude}
    combos = [(cls, design, c1, c2) for cls in CLASSES for design in DESIGNS for c1 in COLOURS for c2 in COLOURS
              if c1 != c2 and (cls, design, frozenset((c1, c2))) not in taken]
    if n > len(combos):
        raise ValueError(f"only {len(combos)} distinct procedural subjects exist, {n} asked")
    random.Random(seed).shuffle(combos)
    return [ToySubject(f"gen-{i:04d}-{cls}-{design}", cls, c1, c2, design)
            for i, (cls, design, c1, c2) in enumerate(combos[:n])]


def subject_scenes(subject: ToySubject, n: int = 5, *, seed: int = SUBJECT_SEED, stream: int = 0) -> list[Scene]:
    """``n`` scenes of the subject: three contexts (varying per subject), random sizes and positions."""
    key = sum(ord(ch) * (i + 1) for i, ch in enumerate(subject.subject_id))
    rng = scene_rng(seed, key, stream=stream)
    contexts = rng.sample(list(CONTEXTS), 3)
    return [place(subject.scene(contexts[i % 3], rng.choice(SIZES)), rng) for i in range(n)]


def subject_images(subject: ToySubject, n: int = 5, *, size: int = 32, seed: int = SUBJECT_SEED,
                   stream: int = 0) -> list[Image.Image]:
    return [render(s, size) for s in subject_scenes(subject, n, seed=seed, stream=stream)]


def random_subject_scene(subject: ToySubject, rng: random.Random) -> Scene:
    """The subject anywhere in the world: any context, size and position (for the judge)."""
    return place(subject.scene(rng.choice(CONTEXTS), rng.choice(SIZES)), rng)


def write_subjects_manifest(out: str | Path, *, images_per_subject: int = 5, overwrite: bool = False,
                            subjects: tuple[ToySubject, ...] | list[ToySubject] = SUBJECTS):
    """Render every subject's photos and build a manifest of them at ``out``."""
    from dreamfleet.data.build import BuildConfig, SubjectSpec, build_manifest

    with tempfile.TemporaryDirectory(prefix="toy-subjects-") as tmp:
        specs = []
        for subject in subjects:
            folder = Path(tmp) / subject.subject_id
            folder.mkdir()
            files = []
            for i, img in enumerate(subject_images(subject, images_per_subject)):
                path = folder / f"{i:02d}.png"
                img.save(path)
                files.append(path)
            specs.append(SubjectSpec(
                subject_id=subject.subject_id, class_noun=subject.cls, files=files,
                eval_prompts=list(EVAL_PROMPTS), source=f"toy-world:{subject.description}",
            ))
        return build_manifest(
            specs, out, BuildConfig(min_side=32, min_images=3), overwrite=overwrite,
            builder={"kind": "toy-subjects", "seed": SUBJECT_SEED, "images_per_subject": images_per_subject},
        )
