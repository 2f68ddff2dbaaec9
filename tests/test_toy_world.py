"""The toy world: deterministic renders, captions in single tokens, subjects as a manifest."""

from __future__ import annotations

import random

import pytest

from dreamfleet.toy.subjects import EVAL_PROMPTS, SUBJECTS, subject_images, write_subjects_manifest
from dreamfleet.toy.world import (
    CLASSES,
    COLOURS,
    CONTEXT_PHRASES,
    CONTEXTS,
    PATTERNS,
    Scene,
    caption,
    random_scene,
    render,
    world_sample,
)


def test_world_is_deterministic_and_unlimited():
    a_img, a_cap, a_scene = world_sample(3, 123_456)
    b_img, b_cap, b_scene = world_sample(3, 123_456)
    assert a_img.tobytes() == b_img.tobytes() and a_cap == b_cap and a_scene == b_scene
    assert a_img.size == (32, 32) and a_img.mode == "RGB"
    assert world_sample(3, 123_457)[0].tobytes() != a_img.tobytes()
    assert world_sample(4, 123_456)[0].tobytes() != a_img.tobytes()
    assert world_sample(0, 5, size=64)[0].size == (64, 64)


def test_world_covers_every_class_context_colour_and_pattern():
    scenes = [world_sample(0, i)[2] for i in range(400)]
    assert {s.cls for s in scenes} == set(CLASSES) and len(CLASSES) >= 4
    assert {s.context for s in scenes} == set(CONTEXTS) and len(CONTEXTS) >= 5
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.pattern for s in scenes} == set(PATTERNS)
    assert all(s.design is None for s in scenes), "subject designs must never appear in pretraining scenes"


def test_caption_names_the_scene():
    scene = Scene(cls="ball", colour="red", pattern="striped", context="beach", size="small")
    assert caption(scene) == "a small red striped ball on the beach"
    rng = random.Random(0)
    short = {caption(scene, rng, keep=0.5) for _ in range(50)}
    assert "a ball" in short and all("ball" in c for c in short)


def test_caption_words_are_single_tokens():
    from dreamfleet.core.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    words = {*CLASSES, *COLOURS, *PATTERNS, "small"} | {w for p in CONTEXT_PHRASES.values() for w in p.split()}
    for w in words:
        assert len(tok(w).input_ids) == 3, f"{w!r} is not one token"


def test_contexts_and_colours_are_visible():
    """The mean colour of a render moves with its context; the object's colour is in its centre."""
    means = {}
    for ctx in CONTEXTS:
        img = render(Scene(cls="box", colour="red", pattern="solid", context=ctx, scale=0.3, x=0.8, y=0.8))
        means[ctx] = img.resize((1, 1)).getpixel((0, 0))
    assert len(set(means.values())) == len(CONTEXTS)
    img = render(Scene(cls="box", colour="blue", pattern="solid", context="grass", scale=0.6, x=0.5, y=0.5))
    r, _g, b = img.getpixel((16, 16))
    assert b > 150 and r < 100


def test_unknown_attribute_is_refused():
    with pytest.raises(ValueError, match="unknown class"):
        Scene(cls="dragon", colour="red", pattern="solid", context="beach")


def test_subjects_are_unique_and_share_classes():
    assert len(SUBJECTS) >= 8
    assert len({(s.cls, s.design, s.colour, s.colour2) for s in SUBJECTS}) == len(SUBJECTS)
    per_class = {c: sum(s.cls == c for s in SUBJECTS) for c in CLASSES}
    assert sum(n >= 2 for n in per_class.values()) >= 2
    ims = subject_images(SUBJECTS[0])
    assert len(ims) == 5 and len({im.tobytes() for im in ims}) == 5
    assert [im.tobytes() for im in subject_images(SUBJECTS[0])] == [im.tobytes() for im in ims]


def test_subjects_manifest(tmp_path):
    from dreamfleet.data.manifest import Manifest

    report = write_subjects_manifest(tmp_path / "toy", images_per_subject=4)
    assert len(report.built) == len(SUBJECTS) and not report.problems
    m = Manifest.open(tmp_path / "toy")
    s = SUBJECTS[1]
    rec = m.record(s.subject_id)
    assert rec.class_noun == s.cls and rec.num_images == 4
    assert rec.prompts("sks")[1] == EVAL_PROMPTS[1].format("sks", s.cls)
    got = [im.tobytes() for _, im, _ in m.read_images(s.subject_id)]
    assert got == [im.tobytes() for im in subject_images(s, 4)]


def test_random_scene_keeps_the_object_inside():
    rng = random.Random(1)
    for _ in range(200):
        s = random_scene(rng)
        assert s.scale / 2 < s.x < 1 - s.scale / 2 and s.scale / 2 < s.y < 1 - s.scale / 2
