"""DreamBooth's claims on the toy model, with fixed seeds (the microbench, small).

The first effect of the paper: after DreamBooth, subject fidelity is far above the base
model's. The second: prompt fidelity stays close to the base model's (recontextualisation
works); "close" is at least 0.85 of the base model's (docs/microbench.md). The third: with
prior preservation, class drift ("a ball" drawing the subject) is clearly lower than
without. The fast test runs one subject with two prompts and asserts the first and third
(two prompts are too few to measure the second), at a third of the microbench's steps and
3.3x its learning rate (400 x 1e-4: 78 s instead of 174 s here; that recipe is in
docs/microbench.md's sweep and draws the subject more strongly, so both effects hold with a
wide margin: measured fidelity 0.57 / 0.10 against the base's 7e-8, class drift 0.57 without
prior preservation and 0.16 with); the slow one runs every toy subject with the full
microbench recipe and asserts all three.
"""

from __future__ import annotations

import pytest

from dreamfleet.eval.microbench import MicrobenchConfig, run_microbench, summarise

FAST = MicrobenchConfig(
    subjects=["ball-halves"],
    train={"num_class_images": 24, "steps": 400, "learning_rate": 1e-4},
    prompts=["a {0} {1}", "a {0} {1} on the beach"],
    images_per_prompt=4,
    class_images=8,
    num_inference_steps=25,
)


def _check_effects(summary: dict[str, dict[str, float]]) -> None:
    base, plain, prior = summary["base"], summary["dreambooth"], summary["dreambooth+prior"]
    # First effect: subject fidelity far above the base model's, which cannot draw the subject
    # (its fidelity is ~1e-7). The judge is conservative on soft samples (docs/toy_world.md),
    # so the absolute level is a lower bound; the ratio and the embedding similarity carry the claim.
    assert base["subject_fidelity"] < 0.01, summary
    for tuned in (plain, prior):
        assert tuned["subject_fidelity"] > max(0.01, 10 * base["subject_fidelity"]), summary
        assert tuned["subject_similarity"] > base["subject_similarity"] + 0.03, summary
    # Third effect: prior preservation keeps "a [class]" from turning into the subject.
    # (Without it the class does drift: the drift is there to be prevented.)
    assert plain["class_drift"] > 0.02, summary
    assert prior["class_drift"] < 0.5 * plain["class_drift"], summary


def test_dreambooth_effects_one_subject(tmp_path):
    rows = run_microbench(tmp_path, FAST)
    _check_effects(summarise(rows))
    assert (tmp_path / "results.md").is_file() and (tmp_path / "results.csv").is_file()
    assert (tmp_path / "grids" / "dreambooth+prior" / "ball-halves.png").is_file()


# "Close to the base model's" prompt fidelity, as docs/microbench.md defines it.
CLOSE = 0.85


@pytest.mark.slow
def test_dreambooth_effects_all_subjects(tmp_path):
    rows = run_microbench(tmp_path, MicrobenchConfig())
    summary = summarise(rows)
    _check_effects(summary)
    # Second effect: recontextualisation works, prompt fidelity stays close to the base model's.
    for label in ("dreambooth", "dreambooth+prior"):
        assert summary[label]["prompt_fidelity"] >= CLOSE * summary["base"]["prompt_fidelity"], summary


def test_eval_writes_table_and_grids(tmp_path):
    import argparse

    from dreamfleet.cli import eval as eval_cli
    from dreamfleet.eval.microbench import microbench_train_config
    from dreamfleet.toy.subjects import SUBJECTS, subject_images, write_subjects_manifest
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    write_subjects_manifest(tmp_path / "manifest", images_per_subject=4)
    s = SUBJECTS[3]
    cfg = microbench_train_config(steps=3, with_prior_preservation=False)
    train_subject(SubjectData(s.subject_id, s.cls, subject_images(s, 4)), "toy", cfg, tmp_path / "experts" / s.subject_id,
                  progress=False)
    parser = argparse.ArgumentParser()
    eval_cli.register(parser.add_subparsers())
    args = parser.parse_args(["eval", str(tmp_path / "experts"), "--manifest", str(tmp_path / "manifest"),
                              "--out", str(tmp_path / "eval"), "--images-per-prompt", "2", "--class-images", "2",
                              "--num-inference-steps", "2", "--include-base"])
    assert args.handler(args) == 0
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "subject_fidelity" in table and "| base |" in table and s.subject_id in table
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # header, base, expert
    from PIL import Image

    grid = Image.open(tmp_path / "eval" / "grids" / f"{s.subject_id}.png")
    assert grid.size == (2 * 32 + 3 * 2, 7 * 32 + 8 * 2)  # 6 prompts + the class prompt, 2 images each
    import json

    from dreamfleet.core.expert import ExpertInfo

    record = json.loads((tmp_path / "eval" / "eval.json").read_text())  # what was scored, how, by which code
    assert (record["config"]["images_per_prompt"], record["config"]["num_inference_steps"]) == (2, 2)
    assert record["manifest"] == str(tmp_path / "manifest") and record["code_version"]
    expert = ExpertInfo.read(tmp_path / "experts" / s.subject_id)
    assert [(e["subject_id"], e["input_hash"]) for e in record["experts"]] == [(s.subject_id, expert.input_hash)]
    assert [r["model"] for r in record["rows"]] == ["base", expert.method]
    assert f'{record["rows"][1]["subject_fidelity"]:.4f}' in rows[2]
