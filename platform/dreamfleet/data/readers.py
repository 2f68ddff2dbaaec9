"""Readers over a manifest: one subject streamed for a trainer worker, or all of it as a Ray Dataset.

Both go through the index, so reading some subjects never touches the shards (or the byte
ranges) of the others.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from dreamfleet.core.images import decode_image
from dreamfleet.data.manifest import Manifest
from dreamfleet.data.schema import SubjectRecord

if TYPE_CHECKING:
    import ray.data


def _open(manifest: Manifest | str | Path) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.open(manifest)


def iter_subject(manifest: Manifest | str | Path, subject_id: str) -> Iterator[tuple[str, Image.Image, dict[str, Any]]]:
    """Stream (key, RGB image, metadata) of one subject, in order, reading its byte range in chunks.

    For 3-5 photos ``Manifest.read_images`` (which checks the subject hash before returning
    anything) is as good; this one keeps memory flat for subjects of thousands of images.
    """
    m = _open(manifest)
    for sample in m.iter_samples(subject_id):
        yield sample.key, decode_image(sample.image, name=f"subject {subject_id!r}: {sample.key}.{sample.ext}"), sample.meta


class _ReadSubject:
    """Ray ``flat_map`` function: one index row in, one row per image out."""

    def __init__(self, manifest: Manifest, decode: bool):
        self.manifest = manifest
        self.decode = decode

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        import numpy as np

        record = SubjectRecord.from_row(json.loads(row["record"]))
        out = []
        for i, sample in enumerate(self.manifest.read_samples(record)):  # the row carries the record
            image: Any = sample.image
            if self.decode:
                name = f"subject {record.subject_id!r}: {sample.key}.{sample.ext}"
                image = np.asarray(decode_image(sample.image, name=name))
            out.append({
                "subject_id": record.subject_id,
                "key": sample.key,
                "index": i,
                "image": image,
                "image_format": sample.ext,
                "caption": sample.meta.get("caption"),
                "meta": json.dumps(sample.meta, sort_keys=True),
                "class_noun": record.class_noun,
                "identifier": record.identifier,
                "tenant": record.tenant,
                "live_subject": record.live_subject,
                "content_hash": record.content_hash,
            })
        return out


def read_manifest_ray(
    manifest: Manifest | str | Path,
    subjects: Sequence[str] | None = None,
    *,
    decode: bool = False,
    override_num_blocks: int | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset with one row per image of ``subjects`` (default: all), subject by subject in key order.

    Columns: subject_id, key, index (position in the subject), image (the stored JPEG/PNG bytes,
    or an HxWx3 uint8 array with ``decode=True``), image_format, caption, meta (the sample's
    JSON), class_noun, identifier, tenant, live_subject, content_hash. Each subject is read by
    one task with a ranged read of its own bytes; the index rows travel with the dataset.
    """
    import ray.data

    m = _open(manifest)
    records = m.records() if subjects is None else [m.record(s) for s in subjects]
    items = [{"subject_id": r.subject_id, "record": json.dumps(r.to_row())} for r in records]
    blocks = override_num_blocks or max(1, min(len(items), 64))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    return ds.flat_map(_ReadSubject(m, decode))
