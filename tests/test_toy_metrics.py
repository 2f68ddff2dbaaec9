"""The toy metrics, validated on real renders: the subject's own images score near the top,
other subjects and ordinary objects of its class near the bottom."""

from __future__ import annotations

import pytest

from dreamfleet.toy import metrics as M
from dreamfleet.toy.judge import ToyJudge, distractor_scene
from dreamfleet.toy.subjects import SUBJECTS, subject_images
from dreamfleet.toy.world import CLASSES, CONTEXT_PHRASES, Scene, place, render, scene_rng


@pytest.fixture(scope="module")
def judge():
    return ToyJudge.load()


def test_judge_separates_subjects_on_held_out_renders(judge):
    report = M.validate_judge(judge, n=12, seed=777)
    for sid, r in report["subject_fidelity"].items():
        assert r["own"] > 0.9, (sid, r)
        assert r["other_subjects"] < 0.05, (sid, r)
        assert r["same_class_objects"] < 0.05, (sid, r)
    assert report["class_accuracy"] > 0.95 and report["context_accuracy"] > 0.95
    assert report["prompt_fidelity_matching"] > 0.9 > 0.1 > report["prompt_fidelity_mismatched"]


def test_manifest_photos_score_as_their_subject(judge):
    """Every subject's training photos are recognised as that subject and no other."""
    for s in SUBJECTS:
        ims = subject_images(s)
        assert M.subject_fidelity(judge, ims, s.subject_id) > 0.9
        for other in SUBJECTS:
            if other is not s:
                assert M.subject_fidelity(judge, ims, other.subject_id) < 0.05


def test_near_misses_are_not_the_subject(judge):
    """The subject's design in other colours, or its colours in another design, is not the subject."""
    rng = scene_rng(99, 0)
    scenes = [distractor_scene(rng) for _ in range(60)]
    _, probs = judge.predict([render(s) for s in scenes])
    assert float(probs["subject"][:, :-1].max(-1).values.mean()) < 0.1


def test_similarity_of_identical_images_is_one(judge):
    ims = subject_images(SUBJECTS[2], 3)
    assert M.subject_similarity(judge, ims, ims[:1] * 2) == pytest.approx(M.subject_similarity(judge, ims, ims[:1]))
    # a float32 cosine of an embedding with itself: 1 up to a few ulp (1e-5 is ~80)
    assert M.subject_similarity(judge, ims[:1], ims[:1]) == pytest.approx(1.0, abs=1e-5)


def test_prompt_fidelity_reads_class_and_context(judge):
    rng = scene_rng(5, 1)
    img = render(place(Scene(cls="kite", colour="red", pattern="solid", context="snow"), rng))
    assert M.prompt_fidelity(judge, [img], "a red kite in the snow") > 0.9
    assert M.prompt_fidelity(judge, [img], "a kite") > 0.9
    # not a float tolerance: the judge gets the class right and the context wrong, half the prompt
    assert M.prompt_fidelity(judge, [img], "a sks kite on the beach") == pytest.approx(0.5, abs=0.1)
    assert M.prompt_fidelity(judge, [img], "a ball at night") < 0.1
    with pytest.raises(ValueError, match="names no toy class"):
        M.prompt_fidelity(judge, [img], "a dog")


def test_parse_prompt():
    assert M.parse_prompt("a sks ball on the beach") == M.PromptContent("ball", "beach")
    assert M.parse_prompt("a cup") == M.PromptContent("cup", None)
    assert {M.parse_prompt(f"a {c} {p}").context for c in CLASSES for p in CONTEXT_PHRASES.values()} == set(
        CONTEXT_PHRASES)


def test_class_drift_of_ordinary_objects_is_low(judge):
    rng = scene_rng(3, 3)
    balls = [render(place(Scene(cls="ball", colour=c, pattern="solid", context="grass"), rng))
             for c in ("red", "blue", "yellow", "purple")]
    assert M.class_drift(judge, balls, "ball-halves") < 0.05
    with pytest.raises(KeyError, match="does not know"):
        M.class_drift(judge, balls, "dog2")
