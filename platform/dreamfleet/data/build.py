"""Building a manifest: subject photos in, WebDataset shards plus a Parquet index out.

The builder takes :class:`SubjectSpec` s (from folders and ``classes.csv``, from DreamBench,
or synthetic), normalises every photo, writes the subjects one after another into shards
and finally the index. Bad photos are skipped with a warning; a subject left with fewer
than ``min_images`` photos is refused; every problem is collected into a
:class:`BuildReport` so that one bad subject never sinks the others. The whole manifest is
built in a temporary folder and renamed into place, so an interrupted build leaves nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from dreamfleet.core.artifacts import atomic_dir
from dreamfleet.core.config import cfg, to_dict
from dreamfleet.core.errors import ConfigError, DataError
from dreamfleet.core.hashing import sha256_bytes, sha256_json
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.images import decode_image, mask_path, open_mask
from dreamfleet.core.version import code_version
from dreamfleet.data.schema import (
    INDEX_FILE,
    INFO_KEY,
    LICENCE_DIR,
    MANIFEST_VERSION,
    SHARD_DIR,
    VERSION_KEY,
    SubjectRecord,
    records_to_table,
)
from dreamfleet.data.shards import Sample, ShardWriter

log = logging.getLogger("dreamfleet")

# Row groups of the index: small enough that finding one subject reads a few tens of KiB.
INDEX_ROW_GROUP = 256


@dataclass
class BuildConfig:
    """How photos are normalised and packed into shards."""

    max_side: int = cfg(1024, "longest side of a stored image in px; larger photos are downscaled (0 keeps every size)")
    min_side: int = cfg(64, "photos whose shorter side is below this many px are skipped")
    min_images: int = cfg(3, "a subject left with fewer usable photos is refused")
    shard_size_mb: float = cfg(256.0, "target shard size in MiB; a subject is split across shards only if larger")
    keep_original_bytes: bool = cfg(
        True,
        "store a JPEG/PNG file unchanged when normalisation leaves its pixels as they are "
        "(otherwise, and always when false, a lossless PNG of the normalised image)",
    )

    def __post_init__(self) -> None:
        if self.min_side < 1:
            raise ConfigError(f"min_side must be at least 1 px, got {self.min_side}")
        if self.max_side and self.max_side < self.min_side:
            raise ConfigError(f"max_side ({self.max_side}) must be 0 or at least min_side ({self.min_side})")
        if self.min_images < 1:
            raise ConfigError(f"min_images must be at least 1, got {self.min_images}")
        if self.shard_size_mb <= 0:
            raise ConfigError(f"shard_size_mb must be positive, got {self.shard_size_mb}")


@dataclass
class SubjectSpec:
    """One subject to build: its photo files (in order) and its index fields."""

    subject_id: str
    class_noun: str
    files: list[Path]
    identifier: str | None = None
    tenant: str | None = None
    steps: int | None = None
    learning_rate: float | None = None
    method: str | None = None
    eval_prompts: list[str] = field(default_factory=list)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    live_subject: bool | None = None
    licence: str | None = None
    source: str | None = None
    sample_meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra per-sample JSON fields (e.g. source URL, licence), by photo file name."""


@dataclass(frozen=True)
class Problem:
    """Something wrong with the input; ``refused`` means the subject was left out of the manifest."""

    subject: str | None
    message: str
    refused: bool = False


@dataclass
class BuildReport:
    out: Path | None
    built: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    num_images: int = 0
    seconds: float = 0.0

    @property
    def refused(self) -> list[str]:
        return sorted({p.subject for p in self.problems if p.refused and p.subject is not None})

    def format(self) -> str:
        lines = [
            f"built {len(self.built)} subject(s), {self.num_images} image(s)"
            + (f" into {self.out}" if self.out else "")
            + (f"; refused {len(self.refused)} subject(s)" if self.refused else "")
        ]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            for p in self.problems:
                tag = "REFUSED" if p.refused else "warning"
                lines.append(f"  [{tag}] {p.message}")
        return "\n".join(lines)


def cap_longest_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so that the longest side is at most ``max_side`` (Lanczos); smaller images are returned as is."""
    if not max_side or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _is_kept_as_is(data: bytes) -> str | None:
    """'jpg'/'png' when decoding ``data`` gives the normalised pixels directly (RGB, upright, one frame)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Image.open(io.BytesIO(data))
        orientation = raw.getexif().get(0x0112)
        if raw.mode != "RGB" or orientation not in (None, 1) or getattr(raw, "n_frames", 1) != 1:
            return None
        return {"JPEG": "jpg", "PNG": "png"}.get(raw.format)


def _raw_size(data: bytes) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return list(Image.open(io.BytesIO(data)).size)


def encode_sample(data: bytes, *, key: str, where: str, config: BuildConfig) -> Sample:
    """Normalise one photo into a stored sample; raises DataError for a photo that cannot be used."""
    img = decode_image(data, name=where, min_side=config.min_side)
    stored = cap_longest_side(img, config.max_side)
    ext = _is_kept_as_is(data) if config.keep_original_bytes and stored is img else None
    if ext is not None:
        image_bytes = data
    else:
        buf = io.BytesIO()
        stored.save(buf, format="PNG")
        ext, image_bytes = "png", buf.getvalue()
    meta = {
        "original_size": _raw_size(data),
        "size": list(stored.size),
        "stored": "original" if image_bytes is data else "normalised",
        "sha256": sha256_bytes(image_bytes),
        "source_sha256": sha256_bytes(data),
    }
    return Sample(key, ext, image_bytes, meta)


def _with_mask(sample: Sample, photo: Path) -> Sample:
    """The sample with the photo's ``NN.mask.png`` (when there is one), fitted to the stored image, as its mask member."""
    path = mask_path(photo)
    if not path.is_file():
        return sample
    buf = io.BytesIO()
    open_mask(path, tuple(sample.meta["size"])).save(buf, format="PNG")
    sample.meta.update(mask_sha256=sha256_bytes(buf.getvalue()), mask_file=path.name)
    return dataclasses.replace(sample, mask=buf.getvalue())


def prepare_subject(spec: SubjectSpec, config: BuildConfig) -> tuple[list[Sample], list[Problem], dict[str, str]]:
    """The subject's samples in file order, the problems met and {file name: sha256} of its inputs."""
    samples: list[Sample] = []
    problems: list[Problem] = []
    inputs: dict[str, str] = {}
    width = max(2, len(str(len(spec.files) - 1)))
    for path in spec.files:
        where = f"subject {spec.subject_id!r}: {path}"
        try:
            data = path.read_bytes()
        except OSError as e:
            problems.append(Problem(spec.subject_id, f"{where}: cannot be read ({e.strerror or e}); skipped"))
            continue
        inputs[path.name] = sha256_bytes(data)
        key = f"{spec.subject_id}/{len(samples):0{width}d}"
        try:
            sample = encode_sample(data, key=key, where=where, config=config)
        except DataError as e:
            problems.append(Problem(spec.subject_id, f"{e} (skipped)"))
            continue
        try:
            sample = _with_mask(sample, path)
        except DataError as e:
            problems.append(Problem(spec.subject_id, f"{e} (the photo is skipped)"))
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        sample.meta.update(
            caption=caption or None,
            source=f"{spec.source}/{path.name}" if spec.source else path.name,
            source_file=path.name,
            licence=spec.licence,
        )
        sample.meta.update(spec.sample_meta.get(path.name, {}))
        samples.append(sample)
    if len(samples) < config.min_images:
        problems.append(Problem(
            spec.subject_id,
            f"subject {spec.subject_id!r}: only {len(samples)} usable image(s) of {len(spec.files)}, at least "
            f"{config.min_images} needed; add photos to {spec.source or 'its folder'} or fix the ones above",
            refused=True,
        ))
    return samples, problems, inputs


def _record(spec: SubjectSpec, samples: list[Sample], writer: ShardWriter) -> SubjectRecord:
    parts, content_hash, members = writer.add_subject(samples)
    return SubjectRecord(
        subject_id=spec.subject_id,
        class_noun=spec.class_noun,
        num_images=len(samples),
        keys=[s.key for s in samples],
        members=members,
        shards=[p.shard for p in parts],
        shard_offsets=[p.offset for p in parts],
        shard_lengths=[p.length for p in parts],
        content_hash=content_hash,
        identifier=spec.identifier,
        tenant=spec.tenant,
        steps=spec.steps,
        learning_rate=spec.learning_rate,
        method=spec.method,
        eval_prompts=list(spec.eval_prompts),
        train_overrides=dict(spec.train_overrides),
        live_subject=spec.live_subject,
        licence=spec.licence,
        source=spec.source,
    )


def manifest_content_hash(records: Iterable[SubjectRecord]) -> str:
    """One hash for the whole manifest: the subjects' ids and content hashes, in id order."""
    return sha256_json(sorted((r.subject_id, r.content_hash) for r in records))


def _check_spec(spec: SubjectSpec, seen: dict[str, Any]) -> Problem | None:
    """Ids are checked here too, for specs that do not come from folders (DreamBench, synthetic)."""
    try:
        validate_subject_id(spec.subject_id, where=spec.source or "")
    except DataError as e:
        return Problem(spec.subject_id, str(e), refused=True)
    if spec.subject_id in seen:
        # Not "refused": the id is in the manifest (the first one); this copy is left out.
        return Problem(spec.subject_id, f"duplicate subject id {spec.subject_id!r}: only the first one is built")
    return None


def _metadata(report: BuildReport, records: list[SubjectRecord], config: BuildConfig, *,
              builder: dict[str, Any], inputs: dict[str, dict[str, str]], shards: list, licences: list[str]) -> dict:
    refused: dict[str, list[str]] = {}
    refused_ids = set(report.refused)
    for p in report.problems:
        if p.subject in refused_ids:
            refused.setdefault(p.subject, []).append(p.message)
    info = {
        "version": MANIFEST_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "builder": {**builder, "config": to_dict(config)},
        "code_version": code_version(),
        "input_hash": sha256_json({"inputs": inputs, "config": to_dict(config)}),
        "content_hash": manifest_content_hash(records),
        "num_subjects": len(records),
        "num_images": report.num_images,
        "shards": [dataclasses.asdict(s) for s in shards],
        "licence_files": licences,
        "refused": refused,
        "warnings": [p.message for p in report.problems if not p.refused],
    }
    return {VERSION_KEY: str(MANIFEST_VERSION).encode(), INFO_KEY: json.dumps(info).encode()}


def build_manifest(
    specs: Iterable[SubjectSpec],
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    builder: dict[str, Any] | None = None,
    problems: list[Problem] | None = None,
    licence_files: Iterable[Path] = (),
    overwrite: bool = False,
) -> BuildReport:
    """Write shards and index for ``specs`` into ``out``; raise DataError when no subject could be built.

    ``problems`` found before (e.g. while reading classes.csv) are carried into the report and
    the manifest's metadata. ``builder`` describes the source (recorded in the metadata).
    """
    config = config or BuildConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    started = time.perf_counter()
    report = BuildReport(out=out, problems=list(problems or []))
    for p in report.problems:
        log.warning("%s", p.message)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, int(config.shard_size_mb * 2**20), shard_dir=SHARD_DIR)
        records: list[SubjectRecord] = []
        inputs: dict[str, dict[str, str]] = {}
        for spec in specs:
            bad_id = _check_spec(spec, inputs)
            if bad_id:
                log.warning("%s", bad_id.message)
                report.problems.append(bad_id)
                continue
            samples, subject_problems, inputs[spec.subject_id] = prepare_subject(spec, config)
            for p in subject_problems:
                log.warning("%s", p.message)
            report.problems += subject_problems
            if any(p.refused for p in subject_problems):
                continue
            records.append(_record(spec, samples, writer))
            report.built.append(spec.subject_id)
            report.num_images += len(samples)
            if len(records) % 1000 == 0:
                log.info("built %d subjects", len(records))
        shards = writer.close()
        if not records:
            report.out = None
            raise DataError("no subject could be built, nothing was written:\n" + report.format())
        licences = []
        for path in licence_files:
            (tmp / LICENCE_DIR).mkdir(exist_ok=True)
            shutil.copyfile(path, tmp / LICENCE_DIR / path.name)
            licences.append(f"{LICENCE_DIR}/{path.name}")
        metadata = _metadata(report, records, config, builder=builder or {}, inputs=inputs, shards=shards,
                             licences=licences)
        pq.write_table(
            records_to_table(records, metadata), tmp / INDEX_FILE,
            row_group_size=INDEX_ROW_GROUP, compression="zstd", write_statistics=["subject_id"],
        )
    report.seconds = time.perf_counter() - started
    return report
