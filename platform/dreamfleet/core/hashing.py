"""Content hashes recorded in every artifact (inputs, configs, weights)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: object) -> str:
    """Hash of a JSON-serialisable object, independent of key order."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Order-independent hash of several files' contents (names excluded: a renamed photo is the same data)."""
    digests = sorted(sha256_file(p) for p in paths)
    return sha256_bytes("\n".join(digests).encode())
