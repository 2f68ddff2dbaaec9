"""The manifest index schema: one Parquet row per subject, described by :class:`SubjectRecord`.

The format is documented in ``manifests/README.md``; a change that an older reader could not
read bumps :data:`MANIFEST_VERSION`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from dreamfleet.core.identifiers import fill_prompt

MANIFEST_VERSION = 1
VERSION_KEY = b"dreamfleet.manifest.version"
INFO_KEY = b"dreamfleet.manifest.info"
INDEX_FILE = "index.parquet"
SHARD_DIR = "shards"
LICENCE_DIR = "licenses"

# Prompt templates use the DreamBench convention: '{0}' is the identifier, '{1}' the class noun.
PROMPT_EXAMPLE = "a {0} {1} in the jungle"


@dataclass
class SubjectRecord:
    """One subject of a manifest: where its images are and how it is to be trained and evaluated."""

    subject_id: str
    class_noun: str
    num_images: int
    keys: list[str]
    """Sample keys in order, ``<subject_id>/<NN>``."""
    members: list[str]
    """Tar member names in order: ``<key>.jpg|.png`` then ``<key>.json`` for each sample."""
    shards: list[str]
    """Shard URLs: relative to the manifest folder unless absolute (``/...`` or ``scheme://...``)."""
    shard_offsets: list[int]
    """Byte offset of the subject's first member in each shard."""
    shard_lengths: list[int]
    """Length in bytes of the subject's contiguous member range in each shard."""
    content_hash: str
    """sha256 of the subject's tar bytes (member headers and data, in order, over all its shards)."""
    identifier: str | None = None
    tenant: str | None = None
    steps: int | None = None
    learning_rate: float | None = None
    method: str | None = None
    eval_prompts: list[str] = field(default_factory=list)
    """Evaluation prompt templates: ``'{0}'`` is the identifier, ``'{1}'`` the class noun."""
    train_overrides: dict[str, Any] = field(default_factory=dict)
    """Free-form overrides of training config fields for this subject (stored as JSON)."""
    live_subject: bool | None = None
    licence: str | None = None
    source: str | None = None
    """Where the subject's photos came from (a folder), for audit."""

    @property
    def num_bytes(self) -> int:
        return sum(self.shard_lengths)

    def prompts(self, identifier: str | None = None) -> list[str]:
        """The evaluation prompts filled in with ``identifier`` (default: the record's) and the class noun."""
        token = identifier if identifier is not None else (self.identifier or "")
        return [fill_prompt(p, token, self.class_noun) for p in self.eval_prompts]

    def to_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["train_overrides"] = json.dumps(self.train_overrides, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SubjectRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in row.items() if k in names}
        kwargs["train_overrides"] = json.loads(kwargs.get("train_overrides") or "{}")
        for name in ("keys", "members", "shards", "shard_offsets", "shard_lengths", "eval_prompts"):
            kwargs[name] = list(kwargs.get(name) or [])
        return cls(**kwargs)


def _str() -> pa.DataType:
    return pa.string()


INDEX_SCHEMA = pa.schema([
    pa.field("subject_id", _str(), nullable=False),
    pa.field("class_noun", _str(), nullable=False),
    pa.field("num_images", pa.int32(), nullable=False),
    pa.field("keys", pa.list_(_str())),
    pa.field("members", pa.list_(_str())),
    pa.field("shards", pa.list_(_str())),
    pa.field("shard_offsets", pa.list_(pa.int64())),
    pa.field("shard_lengths", pa.list_(pa.int64())),
    pa.field("content_hash", _str(), nullable=False),
    pa.field("identifier", _str()),
    pa.field("tenant", _str()),
    pa.field("steps", pa.int64()),
    pa.field("learning_rate", pa.float64()),
    pa.field("method", _str()),
    pa.field("eval_prompts", pa.list_(_str())),
    pa.field("train_overrides", _str()),
    pa.field("live_subject", pa.bool_()),
    pa.field("licence", _str()),
    pa.field("source", _str()),
])

def records_to_table(records: list[SubjectRecord], metadata: dict[bytes, bytes]) -> pa.Table:
    """The index table, sorted by subject id so that row-group statistics locate a subject."""
    rows = [r.to_row() for r in sorted(records, key=lambda r: r.subject_id)]
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    return table.replace_schema_metadata(metadata)
