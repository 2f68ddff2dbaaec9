"""Reading a manifest: the Parquet index, and one subject's images by ranged reads of its shards.

``Manifest.open`` reads only the index footer. Looking a subject up reads the index row group
that holds it (the index is sorted by subject id, and the row-group statistics say which
one), and ``read_images`` reads exactly that subject's byte range of its shard(s): one
``read_at`` per shard part, never another subject's bytes. Any ``pyarrow.fs`` location works
(a local path, ``file://``, ``s3://``, ``gs://``, ``hdfs://``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from dreamfleet.core.errors import DataError, DreamfleetError
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.images import decode_image
from dreamfleet.core.storage import check_location, open_fs
from dreamfleet.data.build import BuildConfig, BuildReport, build_manifest
from dreamfleet.data.folders import build_from_folders
from dreamfleet.data.schema import (
    INDEX_FILE,
    INFO_KEY,
    MANIFEST_VERSION,
    VERSION_KEY,
    SubjectRecord,
)
from dreamfleet.data.shards import Sample, iter_members, iter_samples

__all__ = [
    "MANIFEST_VERSION",
    "BuildConfig",
    "BuildReport",
    "Manifest",
    "SubjectRecord",
    "build_from_folders",
    "build_manifest",
    "resolve",
]

_CHUNK = 1 << 20
_REMOTE_CHUNK = 64 << 20  # object stores: a subject's range in one ranged GET (each request costs ~10-50 ms)


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a ``scheme://`` URI."""
    if filesystem is not None:
        return filesystem, uri
    try:
        return open_fs(uri, what="manifest")
    except DreamfleetError as e:
        raise DataError(str(e)) from None


class _RangeFile(io.RawIOBase):
    """A read-only file over ``[offset, offset + length)`` of ``f``, read in chunks, hashed as it goes."""

    def __init__(self, f: Any, offset: int, length: int, hasher: Any, counter: list[int], chunk: int = _CHUNK):
        self.f, self.pos, self.end, self.chunk = f, offset, offset + length, chunk
        self.hasher, self.counter = hasher, counter
        self.buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        want = self.end - self.pos + len(self.buf) if n is None or n < 0 else n
        while len(self.buf) < want and self.pos < self.end:
            chunk = self.f.read_at(min(max(self.chunk, want), self.end - self.pos), self.pos)
            if not chunk:
                raise DataError("the shard ended inside the subject's byte range (truncated shard)")
            self.pos += len(chunk)
            self.counter[0] += len(chunk)
            self.hasher.update(chunk)
            self.buf += chunk
        out, self.buf = self.buf[:want], self.buf[want:]
        return out


class Manifest:
    """A built manifest: ``Manifest.open(path_or_uri)`` then ``record``/``read_images`` by subject id."""

    def __init__(self, root: str, filesystem: pafs.FileSystem, index_path: str):
        self.root = root
        self.filesystem = filesystem
        self.index_path = index_path
        self.bytes_read = 0
        """Bytes read from shards by this object (the index footer and row groups not included)."""
        self._open_index()

    @classmethod
    def open(cls, uri: str | os.PathLike[str], *, filesystem: pafs.FileSystem | None = None) -> Manifest:
        """Open the manifest folder (or its ``index.parquet``) at a local path or ``pyarrow.fs`` URI."""
        uri = str(uri)
        if filesystem is None:
            try:
                check_location(uri, what="manifest")
            except DreamfleetError as e:
                raise DataError(str(e)) from None
        fs, path = resolve(uri, filesystem)
        path = path.rstrip("/") or "/"
        if path.endswith(".parquet"):
            root, index_path = posixpath.dirname(path), path
        else:
            root, index_path = path, posixpath.join(path, INDEX_FILE)
        info = fs.get_file_info(index_path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(
                f"{uri}: no manifest index ({INDEX_FILE}) there; build one with `dreamfleet manifest build` "
                "or check the path"
            )
        return cls(root, fs, index_path)

    def _open_index(self) -> None:
        try:
            self._file = pq.ParquetFile(self.filesystem.open_input_file(self.index_path))
        except Exception as e:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(f"{self.index_path}: not a readable Parquet manifest index ({e}); rebuild it") from None
        meta = self._file.metadata.metadata or {}
        if VERSION_KEY not in meta:
            raise DataError(
                f"{self.index_path}: not a dreamfleet manifest (no {VERSION_KEY.decode()} in the Parquet "
                "metadata); build it with `dreamfleet manifest build`"
            )
        try:
            version = int(meta[VERSION_KEY])
        except ValueError:
            raise DataError(f"{self.index_path}: manifest version {meta[VERSION_KEY]!r} is not a number") from None
        if version > MANIFEST_VERSION:
            raise DataError(
                f"{self.index_path}: this manifest has format version {version}, newer than the versions this "
                f"dreamfleet reads (up to {MANIFEST_VERSION}); upgrade dreamfleet to read it"
            )
        self.version = version
        self.info: dict[str, Any] = json.loads(meta.get(INFO_KEY, b"{}"))
        self._records: dict[str, SubjectRecord] = {}
        self._all = False
        self._ids: list[str] | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray tasks get the location and reopen the index there.
        return (Manifest, (self.root, self.filesystem, self.index_path))

    def __repr__(self) -> str:
        return f"Manifest({self.root!r}, version={self.version})"

    # ---- the index ----

    def subject_ids(self) -> list[str]:
        if self._ids is None:
            self._ids = self._file.read(columns=["subject_id"]).column(0).to_pylist()
        return list(self._ids)

    def __len__(self) -> int:
        return self._file.metadata.num_rows

    def __contains__(self, subject_id: str) -> bool:
        try:
            self.record(subject_id)
        except DataError:
            return False
        return True

    def _row_groups_for(self, subject_id: str) -> list[int]:
        meta = self._file.metadata
        col = self._file.schema_arrow.get_field_index("subject_id")
        groups = []
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            if stats is None or not stats.has_min_max or stats.min <= subject_id <= stats.max:
                groups.append(i)
        return groups

    def record(self, subject_id: str) -> SubjectRecord:
        """The subject's index row; DataError naming it if the manifest has no such subject."""
        if subject_id not in self._records and not self._all:
            for group in self._row_groups_for(subject_id):
                for row in self._file.read_row_group(group).to_pylist():
                    if row["subject_id"] == subject_id:
                        self._records[subject_id] = SubjectRecord.from_row(row)
        if subject_id not in self._records:
            raise DataError(
                f"subject {subject_id!r} is not in manifest {self.root}; `dreamfleet manifest show {self.root}` "
                "lists its subjects"
            )
        return self._records[subject_id]

    def records(self) -> list[SubjectRecord]:
        if not self._all:
            rows = self._file.read().to_pylist()
            self._records = {row["subject_id"]: SubjectRecord.from_row(row) for row in rows}
            self._all = True
        return list(self._records.values())

    # ---- the shards ----

    def shard_location(self, shard: str) -> tuple[pafs.FileSystem, str]:
        """Filesystem and path of a shard URL from the index (relative to the manifest unless absolute)."""
        if "://" in shard:
            return resolve(shard)
        if shard.startswith("/"):
            return self.filesystem, shard
        return self.filesystem, posixpath.join(self.root, shard)

    def _open_shard(self, record: SubjectRecord, shard: str) -> Any:
        fs, path = self.shard_location(shard)
        try:
            return fs.open_input_file(path)
        except FileNotFoundError:
            raise DataError(
                f"subject {record.subject_id!r}: shard {shard} ({path}) does not exist; the manifest is "
                "incomplete, copy the missing shard or rebuild the manifest"
            ) from None
        except OSError as e:
            raise DataError(f"subject {record.subject_id!r}: shard {shard} ({path}) cannot be opened ({e})") from None

    def _read_parts(self, record: SubjectRecord) -> list[bytes]:
        """The subject's tar bytes, one ranged read per shard part (not yet hash-checked)."""
        parts = []
        for shard, offset, length in zip(record.shards, record.shard_offsets, record.shard_lengths, strict=True):
            f = self._open_shard(record, shard)
            try:
                data = f.read_at(length, offset) if length else b""
            finally:
                f.close()
            self.bytes_read += len(data)
            if len(data) != length:
                raise DataError(
                    f"subject {record.subject_id!r}: shard {shard} ends before the subject's bytes "
                    f"{offset}-{offset + length} (the shard is truncated); copy it again or rebuild the manifest"
                )
            parts.append(data)
        return parts

    @staticmethod
    def _check_hash(record: SubjectRecord, parts: list[bytes]) -> None:
        hasher = hashlib.sha256()
        for data in parts:
            hasher.update(data)
        if hasher.hexdigest() != record.content_hash:
            raise DataError(
                f"subject {record.subject_id!r}: the content of shard(s) {', '.join(record.shards)} does not match "
                f"the index hash (expected {record.content_hash[:12]}..., read {hasher.hexdigest()[:12]}...); the "
                "shard was modified or the index belongs to another build; rebuild the manifest"
            )

    def _subject(self, subject: str | SubjectRecord) -> SubjectRecord:
        return subject if isinstance(subject, SubjectRecord) else self.record(subject)

    def read_raw(self, subject: str | SubjectRecord) -> list[bytes]:
        """The subject's tar bytes, one ranged read per shard part, checked against its content hash."""
        record = self._subject(subject)
        parts = self._read_parts(record)
        self._check_hash(record, parts)
        return parts

    def read_samples(self, subject: str | SubjectRecord) -> list[Sample]:
        """The subject's stored samples (encoded image bytes and JSON metadata), in order, hash-checked.

        ``subject`` is an id, or a record already at hand (then the index is not read).
        """
        record = self._subject(subject)
        subject_id = record.subject_id
        samples = []
        for shard, data in zip(record.shards, self.read_raw(record), strict=True):
            where = f"subject {subject_id!r}: shard {shard}"
            samples += iter_samples(iter_members(io.BytesIO(data), where=where), subject_id=subject_id, where=where)
        if [s.key for s in samples] != record.keys:
            raise DataError(
                f"subject {subject_id!r}: the shard holds samples {[s.key for s in samples]}, the index lists "
                f"{record.keys}; rebuild the manifest"
            )
        return samples

    def read_images(self, subject: str | SubjectRecord) -> list[tuple[str, Image.Image, dict[str, Any]]]:
        """(key, RGB image, per-sample metadata) of each of the subject's images, in order; a
        sample stored with a subject mask has it decoded (8-bit grey) in its metadata's ``mask``.

        Reads only the subject's own byte range(s) and checks its content hash first: DataError
        naming the subject for a missing or truncated shard or a hash mismatch.
        """
        record = self._subject(subject)
        out = []
        for s in self.read_samples(record):
            name = f"subject {record.subject_id!r}: {s.key}"
            meta = dict(s.meta)
            if s.mask is not None:
                meta["mask"] = Image.open(io.BytesIO(s.mask)).convert("L")
            out.append((s.key, decode_image(s.image, name=f"{name}.{s.ext}"), meta))
        return out

    def iter_samples(self, subject: str | SubjectRecord) -> Iterator[Sample]:
        """Stream the subject's samples, reading its range in 1 MiB chunks from local disk (for subjects of
        thousands of images) and in one ranged GET of up to 64 MiB from an object store.

        Each image is checked against the sha256 in its metadata before it is yielded, and the
        whole range against the subject's content hash at the end (raising DataError then).
        """
        record = self._subject(subject)
        subject_id = record.subject_id
        hasher = hashlib.sha256()
        counter = [0]
        count = 0
        for shard, offset, length in zip(record.shards, record.shard_offsets, record.shard_lengths, strict=True):
            f = self._open_shard(record, shard)
            where = f"subject {subject_id!r}: shard {shard}"
            try:
                if f.size() < offset + length:
                    raise DataError(f"{where}: the shard is truncated; copy it again or rebuild the manifest")
                # local disk: 1 MiB reads; an object store: the subject's range in one ranged GET
                local = isinstance(self.shard_location(shard)[0], pafs.LocalFileSystem)
                chunk = _CHUNK if local else _REMOTE_CHUNK
                members = iter_members(_RangeFile(f, offset, length, hasher, counter, chunk), where=where)
                for sample in iter_samples(members, subject_id=subject_id, where=where):
                    if hashlib.sha256(sample.image).hexdigest() != sample.meta.get("sha256"):
                        raise DataError(f"{where}: image {sample.key}.{sample.ext} does not match its hash; "
                                        "rebuild the manifest")
                    if sample.mask is not None and hashlib.sha256(sample.mask).hexdigest() != sample.meta.get(
                            "mask_sha256"):
                        raise DataError(f"{where}: mask {sample.key}.mask.png does not match its hash; "
                                        "rebuild the manifest")
                    count += 1
                    yield sample
            finally:
                f.close()
                self.bytes_read += counter[0]
                counter[0] = 0
        if hasher.hexdigest() != record.content_hash or count != record.num_images:
            raise DataError(
                f"subject {subject_id!r}: the shard content does not match the index (hash or image count); "
                "rebuild the manifest"
            )

    # ---- checking ----

    def validate(self, *, min_side: int = 0) -> list[str]:
        """Read every subject and image; return every problem found (empty when all is well)."""
        problems: list[str] = []
        records = self.records()
        if len(records) != len(self):
            problems.append(f"{self.index_path}: duplicate subject ids in the index; rebuild the manifest")
        for record in records:
            problems += self._validate_subject(record, min_side)
        return problems

    def _validate_subject(self, record: SubjectRecord, min_side: int) -> list[str]:
        sid = record.subject_id
        problems = []
        try:
            validate_subject_id(sid, where=self.index_path)
        except DataError as e:
            problems.append(str(e))
        lists = (record.shards, record.shard_offsets, record.shard_lengths)
        if len({len(x) for x in lists}) != 1 or record.num_images != len(record.keys):
            return [*problems, f"subject {sid!r}: inconsistent index row (shard lists or image count); rebuild"]
        try:
            parts = self._read_parts(record)
        except DataError as e:
            return [*problems, str(e)]
        try:
            self._check_hash(record, parts)
        except DataError as e:
            problems.append(str(e))  # and go on: the images may say more about what is wrong
        samples = []
        for shard, data in zip(record.shards, parts, strict=True):
            where = f"subject {sid!r}: shard {shard}"
            try:
                samples += iter_samples(iter_members(io.BytesIO(data), where=where), subject_id=sid, where=where)
            except DataError as e:
                problems.append(str(e))
        members = [name for s in samples for name, _ in s.members()]
        if ([s.key for s in samples], members) != (record.keys, record.members) and not problems:
            problems.append(f"subject {sid!r}: the shard holds members {members}, the index lists {record.members}; "
                            "rebuild the manifest")
        for s in samples:
            try:
                decode_image(s.image, name=f"subject {sid!r}: {s.key}.{s.ext}", min_side=min_side)
            except DataError as e:
                problems.append(str(e))
        return problems
