"""Subject ids: used as folder names in shards, caches and the registry, so they must be safe."""

from __future__ import annotations

import unicodedata

from dreamfleet.core.errors import DataError

MAX_ID_LENGTH = 128


def validate_subject_id(subject_id: object, *, where: str = "") -> str:
    """Return ``subject_id`` if it is safe as a single path component, else raise DataError.

    Unicode letters and digits are fine; path separators, ``.``/``..``, control characters,
    leading dots or dashes, empty ids and ids over 128 characters are not.
    """
    prefix = f"{where}: " if where else ""
    if not isinstance(subject_id, str):
        raise DataError(f"{prefix}subject id must be a string, got {type(subject_id).__name__}")
    shown = repr(subject_id)
    problem = None
    if not subject_id or not subject_id.strip():
        problem = "is empty"
    elif len(subject_id) > MAX_ID_LENGTH:
        problem = f"is {len(subject_id)} characters long (at most {MAX_ID_LENGTH})"
    elif any(unicodedata.category(c).startswith("C") for c in subject_id):
        problem = "contains control or invisible characters"
    elif "/" in subject_id or "\\" in subject_id:
        problem = "contains a path separator"
    elif subject_id in (".", "..") or subject_id.startswith("."):
        problem = "starts with a dot"
    elif subject_id.startswith("-"):
        problem = "starts with a dash"
    elif subject_id != subject_id.strip():
        problem = "has leading or trailing spaces"
    elif any(c in subject_id for c in ':*?"<>|'):
        problem = 'contains one of the characters : * ? " < > |'
    if problem:
        raise DataError(
            f"{prefix}subject id {shown} {problem}; use letters, digits, '_' and '-' "
            "(it becomes a folder name)"
        )
    return subject_id
