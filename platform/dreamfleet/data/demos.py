"""Demonstration sets: what the apprentice learns from (SuTI's "expert outputs").

A demonstration set *is* a manifest (WebDataset shards grouped by subject + the Parquet
index, readable by ``dreamfleet manifest show|validate``), with two roles of samples per
subject, told apart by their JSON ``role``:

- ``demo``: the subject's real photos, the demonstrations (stored once per subject);
- ``target``: an expert's render kept by the gather filter, with its prompt template
  (``{0}`` identifier, ``{1}`` class noun), seed and scores.

A (demonstrations, prompt, target) triple is one target sample with its subject's demo
samples. Beside the index, ``triples.parquet`` lists every generated pair, kept or not,
with both scores (so the threshold's effect can be read off without generating again),
and ``gather.json`` the counts and the gather config.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dreamfleet.core.errors import DataError

TRIPLES_FILE = "triples.parquet"
GATHER_FILE = "gather.json"


@dataclass
class Target:
    image: Image.Image
    template: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DemoSubject:
    """One subject of a demonstration set."""

    subject_id: str
    class_noun: str
    demos: list[Image.Image]
    targets: list[Target]
    demo_texts: list[str] = field(default_factory=list)


def write_demo_set(subjects: Iterable[DemoSubject], out: str | Path, *, builder: dict[str, Any],
                   overwrite: bool = False):
    """Write subjects (demos + targets) as a manifest at ``out``; returns the BuildReport."""
    from dreamfleet.data.build import BuildConfig, SubjectSpec, build_manifest

    with tempfile.TemporaryDirectory(prefix="demo-set-") as tmp:
        def specs():
            for s in subjects:
                folder = Path(tmp) / s.subject_id
                folder.mkdir()
                files, meta = [], {}
                for i, im in enumerate(s.demos):
                    name = f"demo-{i:02d}.png"
                    im.save(folder / name)
                    files.append(folder / name)
                    text = s.demo_texts[i] if i < len(s.demo_texts) else f"a {{0}} {s.class_noun}"
                    meta[name] = {"role": "demo", "text": text}
                for i, t in enumerate(s.targets):
                    name = f"target-{i:04d}.png"
                    t.image.save(folder / name)
                    files.append(folder / name)
                    meta[name] = {"role": "target", "template": t.template, **t.meta}
                yield SubjectSpec(subject_id=s.subject_id, class_noun=s.class_noun, files=files, sample_meta=meta,
                                  source=f"gather:{s.subject_id}")

        config = BuildConfig(min_side=8, min_images=1, max_side=0)
        return build_manifest(specs(), out, config, builder=builder, overwrite=overwrite)


def read_demo_set(uri: str | Path) -> tuple[list[DemoSubject], dict[str, Any]]:
    """Every subject with at least one demo and one target, and the manifest's metadata."""
    from dreamfleet.data.manifest import Manifest

    m = Manifest.open(str(uri))
    out = []
    for rec in m.records():
        demos, texts, targets = [], [], []
        for key, img, meta in m.read_images(rec):
            role = meta.get("role")
            if role == "demo":
                demos.append(img)
                texts.append(meta.get("text") or "")
            elif role == "target":
                targets.append(Target(img, meta.get("template") or "a {0} {1}", meta))
            else:
                raise DataError(f"{uri}: sample {key!r} has no role 'demo' or 'target'; is this a demonstration set "
                                "written by `dreamfleet apprentice gather`?")
        if demos and targets:
            out.append(DemoSubject(rec.subject_id, rec.class_noun, demos, targets, texts))
    if not out:
        raise DataError(f"{uri}: no subject has both demonstrations and kept targets; lower --threshold when gathering")
    return out, m.info


def filter_demo_set(src: str | Path, out: str | Path, *, threshold: float, min_prompt_score: float | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """A copy of a demonstration set keeping the targets with ``gain >= threshold`` (and the prompt floor).

    Gather once with a low threshold, then filter at several thresholds to measure the filter's
    effect without generating again. ``triples.parquet`` is copied with ``kept`` recomputed.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    subjects, info = read_demo_set(src)
    counts = {"generated": 0, "kept": 0}

    def keep(t: Target) -> bool:
        ps = t.meta.get("prompt_score")
        gain = t.meta.get("gain")
        if gain is None:
            raise DataError(f"{src}: target of template {t.template!r} has no 'gain'; not written by gather")
        return gain >= threshold and not (min_prompt_score is not None and ps is not None and ps == ps
                                          and ps < min_prompt_score)

    def kept_subjects():
        for s in subjects:
            targets = [t for t in s.targets if keep(t)]
            counts["generated"] += len(s.targets)
            counts["kept"] += len(targets)
            if targets:
                yield DemoSubject(s.subject_id, s.class_noun, s.demos, targets, s.demo_texts)

    out = Path(out)
    builder = dict(info.get("builder", {}))
    builder.update(filtered_from=str(src), threshold=threshold, min_prompt_score=min_prompt_score)
    write_demo_set(kept_subjects(), out, builder=builder, overwrite=overwrite)
    src_triples = Path(src) / TRIPLES_FILE
    if src_triples.is_file():
        rows = pq.read_table(src_triples).to_pylist()
        for r in rows:
            ps = r.get("prompt_score")
            r["kept"] = bool(r["gain"] >= threshold and not (min_prompt_score is not None and ps is not None
                                                             and ps == ps and ps < min_prompt_score))
        pq.write_table(pa.Table.from_pylist(rows), out / TRIPLES_FILE)
    record = {"filtered_from": str(src), "threshold": threshold, "min_prompt_score": min_prompt_score,
              "targets_in": counts["generated"], "kept": counts["kept"]}
    (out / GATHER_FILE).write_text(json.dumps(record, indent=1))
    return record
