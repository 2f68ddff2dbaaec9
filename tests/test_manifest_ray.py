"""The Ray Data reader over a small manifest, on the session's local Ray."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from dreamfleet.core.images import open_image
from dreamfleet.data.manifest import Manifest, build_from_folders
from dreamfleet.data.readers import read_manifest_ray


def test_read_manifest_ray(ray_local, tmp_path):
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for sid, n in (("a", 3), ("b", 4), ("c", 3)):
        (root / sid).mkdir(parents=True)
        for j in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 72, 3), dtype=np.uint8)).save(root / sid / f"{j}.png")
    (root / "classes.csv").write_text("subject_id,class_noun,tenant\na,dog,t1\nb,cat,t2\nc,toy,\n")
    build_from_folders(root, None, tmp_path / "m")

    rows = read_manifest_ray(tmp_path / "m", decode=True).take_all()
    assert len(rows) == 10
    by_subject: dict[str, list] = {}
    for row in rows:
        by_subject.setdefault(row["subject_id"], []).append(row)
    assert sorted(by_subject) == ["a", "b", "c"]
    b = sorted(by_subject["b"], key=lambda r: r["index"])
    assert [r["key"] for r in b] == ["b/00", "b/01", "b/02", "b/03"]
    assert b[0]["class_noun"] == "cat" and b[0]["tenant"] == "t2"
    assert b[0]["content_hash"] == Manifest.open(tmp_path / "m").record("b").content_hash
    for j, row in enumerate(b):
        assert json.loads(row["meta"])["source_file"] == f"{j}.png"
        np.testing.assert_array_equal(row["image"], np.asarray(open_image(root / "b" / f"{j}.png")))

    some = read_manifest_ray(Manifest.open(tmp_path / "m"), subjects=["c"]).take_all()
    assert sorted(r["key"] for r in some) == ["c/00", "c/01", "c/02"]
    assert isinstance(some[0]["image"], bytes) and some[0]["image_format"] == "png"
