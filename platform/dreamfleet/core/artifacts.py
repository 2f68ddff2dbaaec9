"""Atomic artifact directories: a crash never leaves half an artifact behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from dreamfleet.core.errors import DataError

T = TypeVar("T")


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    On an exception the temporary folder is removed and ``final`` is untouched. The
    temporary name starts with a dot so that listings of the parent skip it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"{final} already exists; refusing to overwrite it")
        # Move the old one aside first so that the swap itself is a single rename.
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def read_record(cls: type[T], path: Path, schema: int, *, missing: str, newer: str) -> T:
    """A dataclass record (apprentice.json, promptnet.json) from ``path``: ``missing`` when there
    is none, ``newer`` (``{path}``, ``{version}`` filled in) when a newer schema wrote it; fields
    this version does not know are dropped."""
    import dataclasses

    if not path.is_file():
        raise DataError(missing)
    data = read_json(path)
    version = int(data.get("schema_version", 0))
    if version > schema:
        raise DataError(newer.format(path=path, version=version))
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})
