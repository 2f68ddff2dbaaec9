"""The DreamBench manifest, built from ../shared/dreambench with the shipped recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dreamfleet.cli.main import main
from dreamfleet.core.images import list_image_files, open_image
from dreamfleet.data.manifest import Manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_manifest(dreambench, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dreambench") / "manifest"
    recipe = REPO / "manifests" / "dreambench" / "recipe.yaml"
    code = main(["manifest", "build", "--dreambench", str(dreambench), "--config", str(recipe), "--out", str(out),
                 "--strict"])
    assert code == 0
    return out


def test_dreambench_subjects_classes_and_prompts(bench_manifest):
    m = Manifest.open(bench_manifest)
    records = m.records()
    assert len(records) == 30 and sum(r.num_images for r in records) == 158
    assert len({r.class_noun for r in records}) == 15
    assert m.record("bear_plushie").class_noun == "stuffed animal"
    live = sorted(r.subject_id for r in records if r.live_subject)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert all(len(r.eval_prompts) == 25 and r.tenant == "dreambench" for r in records)
    objects, pets = m.record("teapot").eval_prompts, m.record("dog").eval_prompts
    assert len(set(objects) ^ set(pets)) == 20 and objects[0] == pets[0] == "a {0} {1} in the jungle"
    assert "a {0} {1} wearing a santa hat" in pets and "a {0} {1} on top of a mirror" in objects
    assert m.record("dog").prompts("sks")[0] == "a sks dog in the jungle"


def test_dreambench_pixels_licences_and_validation(bench_manifest, dreambench):
    m = Manifest.open(bench_manifest)
    for sid in ("dog", "red_cartoon", "backpack"):
        got = m.read_images(sid)
        files = list_image_files(dreambench / sid)
        assert [meta["source_file"] for _, _, meta in got] == [f.name for f in files]
        for (_, img, meta), f in zip(got, files, strict=True):
            assert meta["stored"] == "original" and meta["licence"]
            np.testing.assert_array_equal(np.asarray(img), np.asarray(open_image(f)))
    assert "Unsplash" in m.record("backpack").licence
    assert m.read_images("backpack")[0][2]["reference"] == "https://unsplash.com/photos/McufHC16mNg"
    assert "Nataniel Ruiz" in m.record("candle").licence
    assert (bench_manifest / "licenses" / "references_and_licenses.txt").is_file()
    assert m.info["licence_files"] == ["licenses/references_and_licenses.txt", "licenses/README.md"]
    assert m.info["builder"]["kind"] == "dreambench" and m.info["refused"] == {}
    assert m.validate() == []
