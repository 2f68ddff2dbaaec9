"""WebDataset tar shards grouped by subject.

A subject's samples are written as one contiguous run of tar members, so that the index can
record its byte range and a reader gets the whole subject with one ranged read. A subject
never straddles two shards unless it is itself larger than the target shard size (apprentice
data); it is then split between samples, one range per shard. Each range is a sequence of
complete tar members, which :func:`iter_members` parses without the rest of the shard.

Members are written deterministically (mtime 0, no owner), so the subject's content hash,
the sha256 of its member bytes, depends only on its samples and not on where they landed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from dreamfleet.core.errors import DataError

IMAGE_EXTS = ("jpg", "png")
MASK_EXT = "mask.png"  # a sample's optional subject mask (8-bit, white = subject)
_BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class Sample:
    """One stored image and its per-sample metadata, keyed ``<subject_id>/<NN>``; optionally
    the subject's mask of it (an 8-bit PNG, white = subject), member ``<NN>.mask.png``."""

    key: str
    ext: str
    image: bytes
    meta: dict[str, Any]
    mask: bytes | None = None

    def members(self) -> list[tuple[str, bytes]]:
        meta = json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode()
        mask = [(f"{self.key}.{MASK_EXT}", self.mask)] if self.mask is not None else []
        return [(f"{self.key}.{self.ext}", self.image), *mask, (f"{self.key}.json", meta)]

    def stored_size(self) -> int:
        """Bytes this sample takes in a tar (headers plus padded data), an estimate for long names."""
        return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in self.members())


@dataclass(frozen=True)
class ShardPart:
    shard: str
    offset: int
    length: int


@dataclass
class ShardSummary:
    path: str
    bytes: int
    subjects: int


class _HashingFile:
    """Passes writes to ``f`` and, while ``hasher`` is set, into the hash too."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.hasher: Any = None

    def write(self, data: bytes) -> int:
        if self.hasher is not None:
            self.hasher.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()


class ShardWriter:
    """Appends subjects to ``<root>/shards/shard-NNNNNN.tar``, rolling over at ``target_bytes``."""

    def __init__(self, root: Path, target_bytes: int, *, shard_dir: str = "shards"):
        self.root = root
        self.shard_dir = shard_dir
        self.target_bytes = max(int(target_bytes), 1)
        self.summaries: list[ShardSummary] = []
        self._file: BinaryIO | None = None
        self._tee: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None

    def _pos(self) -> int:
        return self._file.tell() if self._file is not None else 0

    def _open(self) -> int:
        if self._tar is None:
            name = f"{self.shard_dir}/shard-{len(self.summaries):06d}.tar"
            (self.root / self.shard_dir).mkdir(parents=True, exist_ok=True)
            self._file = open(self.root / name, "wb")  # noqa: SIM115 (both closed in _close_shard)
            self._tee = _HashingFile(self._file)
            self._tar = tarfile.open(fileobj=self._tee, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
            self.summaries.append(ShardSummary(name, 0, 0))
        return self._pos()

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self.summaries[-1].bytes = self._pos()
        self._file.close()
        self._tar = self._file = self._tee = None

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def add_subject(self, samples: list[Sample]) -> tuple[list[ShardPart], str, list[str]]:
        """Write one subject; return its byte ranges, content hash and member names."""
        need = sum(s.stored_size() for s in samples)
        if self._pos() > 0 and self._pos() + need > self.target_bytes:
            self._close_shard()
        hasher = hashlib.sha256()
        parts: list[ShardPart] = []
        members: list[str] = []
        start = self._open()
        for sample in samples:
            if self._pos() - start >= self.target_bytes:  # a subject larger than a shard continues in the next
                parts.append(ShardPart(self.summaries[-1].path, start, self._pos() - start))
                self._close_shard()
                start = self._open()
            self._tee.hasher = hasher
            for name, data in sample.members():
                self._add_member(name, data)
                members.append(name)
            self._tee.hasher = None
        parts.append(ShardPart(self.summaries[-1].path, start, self._pos() - start))
        for part in parts:
            next(s for s in self.summaries if s.path == part.shard).subjects += 1
        return parts, hasher.hexdigest(), members

    def close(self) -> list[ShardSummary]:
        self._close_shard()
        return self.summaries


def iter_members(fileobj: BinaryIO, *, where: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each tar member in ``fileobj``, a byte range of a shard holding whole members."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    raise DataError(f"{where}: tar member {info.name!r} is not a regular file; rebuild the manifest")
                yield info.name, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError) as e:
        raise DataError(
            f"{where}: the shard bytes are not a readable tar range ({e}); the index does not match its "
            "shards, rebuild the manifest"
        ) from None


def split_member_name(name: str) -> tuple[str, str, str]:
    """``'dog/00.jpg'`` -> (subject ``'dog'``, key ``'dog/00'``, extension ``'jpg'``), the WebDataset split."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder, f"{folder}/{stem}" if folder else stem, ext


def iter_samples(members: Iterator[tuple[str, bytes]], *, subject_id: str, where: str) -> Iterator[Sample]:
    """Group consecutive members by key into samples, checking they belong to ``subject_id``."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    for name, data in members:
        folder, member_key, ext = split_member_name(name)
        if folder != subject_id:
            raise DataError(
                f"{where}: tar member {name!r} does not belong to subject {subject_id!r}; the index does not "
                "match its shards, rebuild the manifest"
            )
        if member_key != key and key is not None:
            yield _make_sample(key, parts, where)
            parts = {}
        key = member_key
        parts[ext] = data
    if key is not None:
        yield _make_sample(key, parts, where)


def _make_sample(key: str, parts: dict[str, bytes], where: str) -> Sample:
    exts = [e for e in parts if e in IMAGE_EXTS]
    if len(exts) != 1 or "json" not in parts or set(parts) - {exts[0], "json", MASK_EXT}:
        raise DataError(
            f"{where}: sample {key!r} has members {sorted(parts)}; expected one image (jpg or png), one "
            "json and an optional mask.png; rebuild the manifest"
        )
    try:
        meta = json.loads(parts["json"])
    except ValueError as e:
        raise DataError(f"{where}: {key}.json is not valid JSON ({e}); rebuild the manifest") from None
    return Sample(key, exts[0], parts[exts[0]], meta, parts.get(MASK_EXT))
