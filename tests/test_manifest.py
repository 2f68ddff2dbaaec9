"""Subject manifests: round trip, ranged reads, hashes, versions and every kind of bad input."""

from __future__ import annotations

import dataclasses
import os
import pickle
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dreamfleet.cli.main import main
from dreamfleet.core.config import from_dict, load_recipe
from dreamfleet.core.errors import DataError
from dreamfleet.core.images import open_image
from dreamfleet.data.build import BuildConfig, SubjectSpec, build_manifest, cap_longest_side
from dreamfleet.data.dreambench import DreamBenchConfig
from dreamfleet.data.manifest import Manifest, SubjectRecord, build_from_folders
from dreamfleet.data.readers import iter_subject
from dreamfleet.data.schema import INDEX_FILE, INDEX_SCHEMA, VERSION_KEY

REPO = Path(__file__).resolve().parents[1]


def _img(path: Path, size=(96, 80), seed=0, mode="RGB", **save) -> Path:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    (img if mode == "RGB" else img.convert(mode)).save(path, **save)
    return path


def _subjects(root: Path, counts: dict[str, int], rows: list[str] | None = None,
              header: str = "subject_id,class_noun") -> Path:
    """root/<sid>/NN.png for each subject, and root/classes.csv (class 'dog' unless rows are given)."""
    for i, (sid, n) in enumerate(counts.items()):
        for j in range(n):
            _img(root / sid / f"{j:02d}.png", seed=100 * i + j)
    rows = rows if rows is not None else [f"{sid},dog" for sid in counts]
    (root / "classes.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return root


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def _messages(report) -> str:
    return "\n".join(p.message for p in report.problems)


# ---- round trip ----


def test_round_trip_same_pixels_in_order(tmp_path):
    root = tmp_path / "src"
    _img(root / "dog" / "a.jpg", seed=1, quality=90)           # JPEG kept byte for byte
    _img(root / "dog" / "b.png", seed=2)                       # PNG kept
    _img(root / "dog" / "c.png", seed=3, mode="L")             # greyscale: normalised to RGB PNG
    (root / "dog" / "b.txt").write_text("a photo of my dog on the sofa\n")
    for j in range(3):
        _img(root / "café" / f"{j}.webp", seed=10 + j, lossless=True)
    (root / "classes.csv").write_text(
        "subject_id,class_noun,identifier,tenant,steps,learning_rate,method,live_subject,eval_prompts,train_overrides\n"
        'dog,dog,sks,acme,400,5e-06,lora,true,a {0} {1} in the jungle|a red {0} {1},"{""rank"": 8}"\n'
        "café,cup,,,,,,,,\n",
        encoding="utf-8",
    )
    report = build_from_folders(root, None, tmp_path / "m")
    assert report.problems == [] and sorted(report.built) == ["café", "dog"]

    m = Manifest.open(tmp_path / "m")
    assert m.subject_ids() == ["café", "dog"] and len(m) == 2
    for sid in ("dog", "café"):
        files = sorted((root / sid).glob("*.[jpw]*[gp]"))
        got = m.read_images(sid)
        assert [k for k, _, _ in got] == [f"{sid}/{i:02d}" for i in range(len(files))]
        assert [meta["source_file"] for _, _, meta in got] == [f.name for f in files]
        for (_, img, meta), f in zip(got, files, strict=True):
            assert img.mode == "RGB"
            np.testing.assert_array_equal(_pixels(img), _pixels(open_image(f)))
            assert meta["size"] == list(img.size)
    stored = [meta["stored"] for _, _, meta in m.read_images("dog")]
    assert stored == ["original", "original", "normalised"]
    assert m.read_images("dog")[1][2]["caption"] == "a photo of my dog on the sofa"

    dog = m.record("dog")
    assert (dog.class_noun, dog.identifier, dog.tenant, dog.steps, dog.learning_rate, dog.method) == (
        "dog", "sks", "acme", 400, 5e-06, "lora")
    assert dog.live_subject is True and dog.train_overrides == {"rank": 8}
    assert dog.prompts() == ["a sks dog in the jungle", "a red sks dog"]
    assert dog.members[:2] == ["dog/00.jpg", "dog/00.json"] and dog.num_images == 3
    cafe = m.record("café")
    assert cafe.identifier is None and cafe.eval_prompts == [] and cafe.train_overrides == {}
    assert [r.subject_id for r in m.records()] == ["café", "dog"]
    streamed = list(iter_subject(tmp_path / "m", "dog"))
    assert [k for k, _, _ in streamed] == [k for k, _, _ in m.read_images("dog")]


def test_exif_rotation_and_longest_side_cap(tmp_path):
    root = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    _img(root / "s" / "00.jpg", size=(120, 80), seed=1, exif=exif.tobytes())
    _img(root / "s" / "01.png", size=(300, 150), seed=2)
    _img(root / "s" / "02.png", size=(100, 100), seed=3)
    (root / "classes.csv").write_text("subject_id,class_noun\ns,vase\n")
    build_from_folders(root, None, tmp_path / "m", BuildConfig(max_side=128))
    got = Manifest.open(tmp_path / "m").read_images("s")
    assert [img.size for _, img, _ in got] == [(80, 120), (128, 64), (100, 100)]
    assert got[0][2]["original_size"] == [120, 80] and got[0][2]["stored"] == "normalised"
    for (_, img, _), f in zip(got, sorted((root / "s").iterdir()), strict=False):
        expected = cap_longest_side(open_image(f), 128)
        np.testing.assert_array_equal(_pixels(img), _pixels(expected))


def test_reads_only_the_subjects_own_byte_range(tmp_path):
    counts = {f"s{i:02d}": 3 for i in range(12)}
    _subjects(tmp_path / "src", counts)
    build_from_folders(tmp_path / "src", None, tmp_path / "m", BuildConfig(shard_size_mb=0.1))
    m = Manifest.open(tmp_path / "m")
    shards = sorted((tmp_path / "m" / "shards").iterdir())
    assert len(shards) > 2, "the test needs several shards"
    rec = m.record("s05")
    assert len(rec.shards) == 1
    expected = m.read_images("s05")
    mine = tmp_path / "m" / rec.shards[0]
    for shard in shards:  # every other shard gone ...
        if shard != mine:
            shard.unlink()
    data = bytearray(mine.read_bytes())  # ... and every byte of the shard outside the range garbage
    start, end = rec.shard_offsets[0], rec.shard_offsets[0] + rec.shard_lengths[0]
    data[:start] = b"\xff" * start
    data[end:] = b"\xff" * (len(data) - end)
    mine.write_bytes(bytes(data))
    m = Manifest.open(tmp_path / "m")
    got = m.read_images("s05")
    assert m.bytes_read == rec.num_bytes < len(data)
    for (k1, a, _), (k2, b, _) in zip(got, expected, strict=True):
        assert k1 == k2
        np.testing.assert_array_equal(_pixels(a), _pixels(b))


def test_subject_larger_than_a_shard_is_split_and_hash_is_layout_free(tmp_path):
    _subjects(tmp_path / "src", {"big": 8, "small": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "one")
    build_from_folders(tmp_path / "src", None, tmp_path / "split", BuildConfig(shard_size_mb=0.03))
    one, split = Manifest.open(tmp_path / "one"), Manifest.open(tmp_path / "split")
    assert len(split.record("big").shards) > 1 and len(one.record("big").shards) == 1
    assert split.record("big").content_hash == one.record("big").content_hash
    assert split.info["content_hash"] == one.info["content_hash"]
    a = [_pixels(img) for _, img, _ in one.read_images("big")]
    b = [_pixels(img) for _, img, _ in split.read_images("big")]
    c = [_pixels(img) for _, img, _ in iter_subject(split, "big")]
    assert len(a) == 8
    for x, y, z in zip(a, b, c, strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_open_by_uri_index_path_and_pickle(tmp_path, monkeypatch):
    _subjects(tmp_path / "src", {"a": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    for where in (f"file://{tmp_path / 'm'}", str(tmp_path / "m" / INDEX_FILE), "m", Path("m")):
        assert [k for k, _, _ in Manifest.open(where).read_images("a")] == ["a/00", "a/01", "a/02"]
    m = pickle.loads(pickle.dumps(Manifest.open("m")))
    assert len(m.read_images("a")) == 3


def test_any_pyarrow_filesystem(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    _subjects(tmp_path / "src", {"a": 3, "b": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "m")
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path / "m"), "/bucket/m", recursive=True)
    m = Manifest.open("/bucket/m", filesystem=PyFileSystem(FSSpecHandler(mem)))
    assert m.subject_ids() == ["a", "b"] and len(m.read_images("b")) == 3 and m.validate() == []
    mem.rm("/bucket/m", recursive=True)
    with pytest.raises(DataError, match=r"manifest .nope:..bucket.m.: cannot open its filesystem"):
        Manifest.open("nope://bucket/m")


def test_metadata_records_config_code_version_and_hashes(tmp_path):
    _subjects(tmp_path / "src", {"a": 3, "b": 4})
    build_from_folders(tmp_path / "src", None, tmp_path / "m1", BuildConfig(max_side=512))
    build_from_folders(tmp_path / "src", None, tmp_path / "m2", BuildConfig(max_side=512))
    info = Manifest.open(tmp_path / "m1").info
    assert info["version"] == 1 and info["builder"]["kind"] == "folders"
    assert info["builder"]["config"]["max_side"] == 512
    assert set(info["code_version"]) >= {"package", "git_commit"}
    assert info["num_subjects"] == 2 and info["num_images"] == 7
    # Deterministic: the same input gives the same hashes and the same bytes.
    info2 = Manifest.open(tmp_path / "m2").info
    assert (info2["input_hash"], info2["content_hash"]) == (info["input_hash"], info["content_hash"])
    shard = "shards/shard-000000.tar"
    assert (tmp_path / "m1" / shard).read_bytes() == (tmp_path / "m2" / shard).read_bytes()
    _img(tmp_path / "src" / "b" / "00.png", seed=999)
    build_from_folders(tmp_path / "src", None, tmp_path / "m3", BuildConfig(max_side=512))
    info3 = Manifest.open(tmp_path / "m3").info
    assert info3["input_hash"] != info["input_hash"] and info3["content_hash"] != info["content_hash"]
    m1, m3 = Manifest.open(tmp_path / "m1"), Manifest.open(tmp_path / "m3")
    assert m1.record("a").content_hash == m3.record("a").content_hash
    assert m1.record("b").content_hash != m3.record("b").content_hash


def test_index_schema_matches_subject_record():
    assert [f.name for f in INDEX_SCHEMA] == [f.name for f in dataclasses.fields(SubjectRecord)]


def _rewrite_index(path: Path, *, metadata: dict | None = None, column: tuple | None = None) -> None:
    table = pq.read_table(path / INDEX_FILE)
    meta = dict(table.schema.metadata)
    meta.update(metadata or {})
    if column:
        name, fn = column
        idx = table.schema.get_field_index(name)
        table = table.set_column(idx, table.schema.field(idx), [[fn(v) for v in table.column(name).to_pylist()]])
    pq.write_table(table.replace_schema_metadata(meta), path / INDEX_FILE)


def test_manifest_from_the_future_is_refused(tmp_path):
    _subjects(tmp_path / "src", {"a": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "m")
    _rewrite_index(tmp_path / "m", metadata={VERSION_KEY: b"2"})
    with pytest.raises(DataError, match=r"format version 2, newer .* upgrade dreamfleet"):
        Manifest.open(tmp_path / "m")


def test_not_a_manifest(tmp_path):
    with pytest.raises(DataError, match="no manifest index"):
        Manifest.open(tmp_path / "nowhere")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / INDEX_FILE).write_text("hello")
    with pytest.raises(DataError, match="not a readable Parquet"):
        Manifest.open(tmp_path / "x")
    pq.write_table(pq.read_table(_write_plain_parquet(tmp_path)), tmp_path / "x" / INDEX_FILE)
    with pytest.raises(DataError, match="not a dreamfleet manifest"):
        Manifest.open(tmp_path / "x")


def _write_plain_parquet(tmp_path: Path) -> Path:
    import pyarrow as pa

    pq.write_table(pa.table({"subject_id": ["a"]}), tmp_path / "plain.parquet")
    return tmp_path / "plain.parquet"


def test_unknown_subject_names_it(tmp_path):
    _subjects(tmp_path / "src", {"a": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "m")
    m = Manifest.open(tmp_path / "m")
    with pytest.raises(DataError, match="subject 'zebra' is not in manifest"):
        m.read_images("zebra")
    assert "a" in m and "zebra" not in m


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    from dreamfleet.data import shards

    _subjects(tmp_path / "src", {"a": 3, "b": 3, "c": 3})
    calls = []
    original = shards.ShardWriter.add_subject

    def crash_on_second(self, samples):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, samples)

    monkeypatch.setattr(shards.ShardWriter, "add_subject", crash_on_second)
    out = tmp_path / "out" / "m"
    with pytest.raises(KeyboardInterrupt):
        build_from_folders(tmp_path / "src", None, out)
    assert not out.exists() and list((tmp_path / "out").iterdir()) == []


# ---- bad input: build skips and reports, the rest still builds ----


def test_bad_images_are_skipped_and_a_thin_subject_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # so that a small file is a "bomb"
    root = tmp_path / "src"
    good = root / "good"
    for j in range(3):
        _img(good / f"{j:02d}.png", size=(64, 64), seed=j)
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    frames[0].save(good / "03_anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    (good / "04_empty.jpg").write_bytes(b"")
    (good / "05_text.jpg").write_text("this is not a photo\n")
    jpeg = _img(tmp_path / "t.jpg", size=(96, 96), seed=5, quality=95).read_bytes()
    (good / "06_truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    _img(good / "07_tiny.png", size=(32, 90), seed=6)
    _img(good / "08_bomb.png", size=(128, 128), seed=7)    # over MAX_IMAGE_PIXELS: warning made an error
    _img(good / "09_bomb.png", size=(160, 160), seed=8)    # over twice MAX_IMAGE_PIXELS: PIL's own error
    (good / "notes.docx").write_text("ignored")
    thin = root / "thin"
    _img(thin / "00.png", size=(64, 64), seed=20)
    _img(thin / "01.png", size=(64, 64), seed=21)
    (thin / "02.jpg").write_bytes(b"")
    (root / "classes.csv").write_text("subject_id,class_noun\ngood,dog\nthin,cat\n")

    report = build_from_folders(root, None, tmp_path / "m")
    text = _messages(report)
    assert report.built == ["good"] and report.refused == ["thin"]
    for name, why in [("04_empty.jpg", "empty"), ("05_text.jpg", "not a readable image"),
                      ("06_truncated.jpg", "truncated"), ("07_tiny.png", "below the minimum side"),
                      ("08_bomb.png", "decompression bomb"), ("09_bomb.png", "decompression bomb")]:
        line = next(line for line in text.splitlines() if name in line)
        assert "subject 'good'" in line and why in line, line
    assert "notes.docx" in text
    assert "subject 'thin': only 2 usable image(s) of 3, at least 3 needed" in text
    assert "thin/02.jpg" in text
    assert "REFUSED" in report.format()
    m = Manifest.open(tmp_path / "m")
    assert m.subject_ids() == ["good"] and m.info["refused"].keys() == {"thin"}
    got = m.read_images("good")
    assert len(got) == 4 and got[3][2]["source_file"] == "03_anim.gif"
    np.testing.assert_array_equal(_pixels(got[3][1]), _pixels(frames[0]))


def test_duplicate_subject_ids_are_refused(tmp_path):
    root = tmp_path / "src"
    _subjects(root, {"dog": 3, "cat": 3}, rows=["dog,dog", "cat,cat", "dog,wolf"])
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    for j in range(3):
        _img(root / nfc / f"{j}.png", seed=50 + j)
        _img(root / nfd / f"{j}.png", seed=60 + j)
    if len([p for p in root.iterdir() if p.is_dir()]) < 4:
        pytest.skip("this filesystem normalises Unicode file names")
    with open(root / "classes.csv", "a", encoding="utf-8") as f:
        f.write(f"{nfc},cup\n")
    report = build_from_folders(root, None, tmp_path / "m")
    text = _messages(report)
    assert report.built == ["cat"] and report.refused == sorted(["dog", nfc])
    assert "duplicate subject id 'dog' on lines 2, 4" in text
    assert "same subject id" in text and "NFC" in text


@pytest.mark.parametrize("bad_id, why", [
    ("../x", "path separator"), ("a/b", "path separator"), ("", "empty"),
    ("x" * 129, "129 characters"), ("bad\x07id", "control"), ("-rf", "dash"),
])
def test_unsafe_subject_ids_are_refused(tmp_path, bad_id, why):
    root = _subjects(tmp_path / "src", {"猫_ß": 3, "ok": 3}, rows=["猫_ß,cat", "ok,dog", f"{bad_id},dog"])
    report = build_from_folders(root, None, tmp_path / "m")
    assert sorted(report.built) == ["ok", "猫_ß"]
    assert why in _messages(report) and "line 4" in _messages(report)


def test_unsafe_folder_name_is_refused(tmp_path):
    root = _subjects(tmp_path / "src", {"ok": 3, "-x": 3, ".hidden": 3}, rows=["ok,dog"])
    report = build_from_folders(root, None, tmp_path / "m")
    assert report.built == ["ok"] and report.refused == ["-x"]
    assert "folder" in _messages(report) and ".hidden" not in _messages(report)


def test_generic_builder_checks_ids_too(tmp_path):
    files = [_img(tmp_path / f"{j}.png", seed=j) for j in range(3)]
    specs = [SubjectSpec("x", "dog", files), SubjectSpec("x", "cat", files), SubjectSpec("../y", "dog", files)]
    report = build_manifest(specs, tmp_path / "m")
    assert report.built == ["x"] and report.refused == ["../y"]
    assert "duplicate subject id 'x'" in _messages(report) and "path separator" in _messages(report)
    assert Manifest.open(tmp_path / "m").record("x").class_noun == "dog"


def test_unknown_class_noun_column(tmp_path):
    root = _subjects(tmp_path / "src", {"a": 3}, rows=["a,dog"], header="subject_id,class_name")
    with pytest.raises(DataError) as e:
        build_from_folders(root, None, tmp_path / "m")
    msg = str(e.value)
    assert "classes.csv" in msg and "missing column(s) 'class_noun'" in msg and "unknown column(s) 'class_name'" in msg
    assert "expected columns: subject_id, class_noun (required)" in msg and "learning_rate" in msg
    assert not (tmp_path / "m").exists()


def test_dreambenchs_header_and_its_own_file_are_accepted(tmp_path, dreambench):
    """DreamBench says ``subject_name,class``: aliases of subject_id and class_noun. Its
    prompts_and_classes.txt (a title, the table, then prompt lists) is read as a classes file;
    a header that names a column twice through an alias is refused."""
    root = _subjects(tmp_path / "src", {"a": 3, "b": 3}, rows=["a,dog", "b,teapot"], header="subject_name,class")
    build_from_folders(root, None, tmp_path / "m")
    assert Manifest.open(tmp_path / "m").record("b").class_noun == "teapot"
    src = tmp_path / "bench"
    for sid in ("dog2", "teapot"):
        for j, f in enumerate(sorted((dreambench / sid).iterdir())[:3]):
            (src / sid).mkdir(parents=True, exist_ok=True)
            (src / sid / f"{j}{f.suffix}").write_bytes(f.read_bytes())
    report = build_from_folders(src, dreambench / "prompts_and_classes.txt", tmp_path / "m2")
    m = Manifest.open(tmp_path / "m2")
    assert (m.record("dog2").class_noun, m.record("teapot").class_noun) == ("dog", "teapot")
    assert sorted(report.built) == ["dog2", "teapot"]
    # the 28 other rows are reported as subjects without a folder (at their own line); the prompt lists are not rows
    assert len(report.problems) == 28 and all("has no folder" in pr.message for pr in report.problems)
    assert "prompts_and_classes.txt line 4: subject 'backpack'" in report.problems[0].message
    _subjects(tmp_path / "twice", {"a": 3}, rows=["a,dog,dog"], header="subject_id,class,class_noun")
    with pytest.raises(DataError, match="'class_noun' appear twice"):
        build_from_folders(tmp_path / "twice", None, tmp_path / "m3")


def test_folders_and_rows_that_do_not_match_and_bad_values(tmp_path):
    root = _subjects(tmp_path / "src", {"a": 3, "b": 3, "c": 3, "d": 3},
                     rows=["a,dog,", "c,dog,abc", "d,,", "ghost,dog,"], header="subject_id,class_noun,steps")
    report = build_from_folders(root, None, tmp_path / "m")
    text = _messages(report)
    assert report.built == ["a"] and report.refused == ["b", "c", "d", "ghost"]
    assert "subject 'b' (folder" in text and "is not in" in text and "add a row 'b,<class noun>'" in text
    assert "column 'steps' must be a number, got 'abc'" in text
    assert "subject 'd' has an empty class_noun" in text
    assert "subject 'ghost' has no folder" in text


def test_nothing_buildable_writes_nothing(tmp_path):
    root = _subjects(tmp_path / "src", {"a": 2}, rows=["a,dog"])
    with pytest.raises(DataError, match=r"no subject could be built(.|\n)*only 2 usable"):
        build_from_folders(root, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


# ---- bad manifests: reader and validate ----


def _built(tmp_path: Path, counts: dict[str, int], **config) -> Path:
    _subjects(tmp_path / "src", counts)
    build_from_folders(tmp_path / "src", None, tmp_path / "m", BuildConfig(**config))
    return tmp_path / "m"


def test_missing_shard(tmp_path):
    path = _built(tmp_path, {"a": 3, "b": 3, "c": 3}, shard_size_mb=0.05)
    m = Manifest.open(path)
    lost = m.record("b").shards[0]
    (path / lost).unlink()
    with pytest.raises(DataError, match=rf"subject 'b': shard {lost} .* does not exist"):
        m.read_images("b")
    victims = [r.subject_id for r in m.records() if lost in r.shards]
    problems = Manifest.open(path).validate()
    assert len(problems) == len(victims) and all("does not exist" in p for p in problems)


def test_hash_mismatch_and_every_problem_reported(tmp_path):
    path = _built(tmp_path, {"a": 3, "b": 3, "c": 3})
    m = Manifest.open(path)
    rec = m.record("a")
    shard = path / rec.shards[0]
    data = bytearray(shard.read_bytes())
    data[rec.shard_offsets[0] + 512 + 100] ^= 0xFF  # inside a/00.png's data
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"subject 'a': the content of shard.* does not match the index hash"):
        Manifest.open(path).read_images("a")
    with pytest.raises(DataError, match="subject 'a'"):
        list(iter_subject(path, "a"))
    # An index whose hash belongs to other shards: 'c' gets a wrong hash.
    _rewrite_index(path, column=("content_hash", lambda h: "0" * 64 if h == Manifest.open(path).record("c").content_hash else h))
    assert len(Manifest.open(path).read_images("b")) == 3
    problems = Manifest.open(path).validate()
    assert any("subject 'a'" in p and "hash" in p for p in problems)
    assert any("subject 'a'" in p and "a/00.png" in p for p in problems)  # the image itself, too
    assert any("subject 'c'" in p and "hash" in p for p in problems)
    assert not any("subject 'b'" in p for p in problems)
    assert main(["manifest", "validate", str(path)]) == 1


def test_validate_finds_an_index_that_lists_other_members(tmp_path):
    path = _built(tmp_path, {"a": 3, "b": 3})
    _rewrite_index(path, column=("members", lambda ms: [m.replace("/02.", "/09.") for m in ms]))
    problems = Manifest.open(path).validate()
    assert len(problems) == 2 and all("the index lists" in p for p in problems)


# ---- CLI ----


def test_cli_build_show_validate(tmp_path, capsys):
    root = _subjects(tmp_path / "src", {"a": 3, "b": 2})
    out = tmp_path / "m"
    assert main(["manifest", "build", "--from-folders", str(root), "--out", str(out), "--max-side", "80"]) == 0
    printed = capsys.readouterr().out
    assert "built 1 subject(s)" in printed and "[REFUSED] subject 'b'" in printed
    assert Manifest.open(out).info["builder"]["config"]["max_side"] == 80
    assert main(["manifest", "build", "--from-folders", str(root), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["manifest", "build", "--from-folders", str(root), "--out", str(out), "--overwrite", "--strict"]) == 1
    assert main(["manifest", "show", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "subject_id" in printed and "\na " in printed and "refused at build time: b" in printed
    assert main(["manifest", "show", str(out), "--subject", "a"]) == 0
    assert '"class_noun": "dog"' in capsys.readouterr().out
    assert main(["manifest", "validate", str(out)]) == 0
    assert "ok: 1 subjects, 3 images" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path, capsys):
    root = _subjects(tmp_path / "src", {"a": 1}, header="subject_id,clas")  # a typo (`class` is DreamBench's alias)
    assert main(["manifest", "build", "--from-folders", str(root), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'class_noun'" in err and "Traceback" not in err
    assert main(["manifest", "show", str(tmp_path / "none")]) == 2


def test_shipped_dreambench_recipe_parses():
    data = load_recipe(REPO / "manifests" / "dreambench" / "recipe.yaml")
    config = from_dict(DreamBenchConfig, data)
    assert config.live_classes == ["cat", "dog"] and config.build.max_side == 512
    assert os.access(REPO / "manifests" / "dreambench" / "build.sh", os.X_OK)
