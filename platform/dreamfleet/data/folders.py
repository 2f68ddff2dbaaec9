"""Subjects from one folder per subject plus a ``classes.csv``.

``classes.csv`` has a header row with ``subject_id`` and ``class_noun`` (or DreamBench's
``subject_name`` and ``class``; its ``prompts_and_classes.txt`` is read as it is) and,
optionally, the columns in :data:`OPTIONAL_COLUMNS`. A header that lacks a required column or has an unknown
one is refused as a whole (a typo such as ``clas_noun`` would otherwise lose every class noun).
Rows are then checked one by one; a bad row, a folder without a row and a row without a
folder are each reported for that subject, and the other subjects still build.

Folder names and ids are compared after Unicode NFC normalisation, so ``café`` typed on
macOS (NFD) and on Linux (NFC) are the same subject; two folders that normalise to the same
id are both refused as duplicates.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamfleet.core.errors import DataError
from dreamfleet.core.ids import validate_subject_id
from dreamfleet.core.images import IMAGE_EXTENSIONS, list_image_files
from dreamfleet.data.build import BuildConfig, BuildReport, Problem, SubjectSpec, build_manifest

REQUIRED_COLUMNS = ("subject_id", "class_noun")
# DreamBench's prompts_and_classes.txt says ``subject_name,class``
ALIASES = {"subject_name": "subject_id", "class": "class_noun"}
OPTIONAL_COLUMNS = (
    "identifier", "tenant", "steps", "learning_rate", "method", "live_subject",
    "eval_prompts", "train_overrides", "licence",
)
PROMPT_SEPARATOR = "|"
SIDECAR_EXTENSIONS = frozenset({".txt"})


@dataclass
class ClassRow:
    line: int
    fields: dict[str, Any] = field(default_factory=dict)


def _parse_value(column: str, text: str, where: str) -> Any:
    if text == "":
        return [] if column == "eval_prompts" else ({} if column == "train_overrides" else None)
    try:
        if column == "steps":
            return int(text)
        if column == "learning_rate":
            return float(text)
    except ValueError:
        raise DataError(f"{where}: column {column!r} must be a number, got {text!r}") from None
    if column == "live_subject":
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise DataError(f"{where}: column 'live_subject' must be true or false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if column == "eval_prompts":
        return [p.strip() for p in text.split(PROMPT_SEPARATOR) if p.strip()]
    if column == "train_overrides":
        try:
            value = json.loads(text)
        except ValueError as e:
            raise DataError(f"{where}: column 'train_overrides' is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise DataError(f"{where}: column 'train_overrides' must be a JSON object like {{\"steps\": 400}}")
        return value
    return text


def _check_header(path: Path, header: list[str] | None) -> list[str]:
    expected = (
        f"expected columns: {', '.join(REQUIRED_COLUMNS)} (required), {', '.join(OPTIONAL_COLUMNS)} (optional)"
    )
    if not header:
        raise DataError(f"{path}: the file is empty; it needs a header row ({expected})")
    columns = [ALIASES.get(c.strip(), c.strip()) for c in header]
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise DataError(f"{path}: column(s) {', '.join(map(repr, twice))} appear twice in the header {header} "
                        f"(counting the aliases {', '.join(f'{a}={c}' for a, c in ALIASES.items())}); keep one")
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    unknown = [c for c in columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing column(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown column(s) {', '.join(map(repr, unknown))}")
        raise DataError(f"{path}: {' and '.join(parts)} in the header {columns}; {expected}")
    return columns


def _table_lines(path: Path) -> tuple[int, list[str]]:
    """The CSV's lines and the line number before the first. DreamBench's own
    ``prompts_and_classes.txt`` is taken as it is: a ``Classes`` title line, the table, then a
    blank line and its prompt lists, which are not rows."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if not lines or lines[0].strip() != "Classes":
        return 0, lines
    start = next((i for i, line in enumerate(lines[1:], 1) if line.strip()), len(lines))
    end = next((i for i, line in enumerate(lines[start:], start) if not line.strip()), len(lines))
    return start, lines[start:end]


def read_classes_csv(path: str | Path) -> tuple[dict[str, ClassRow], list[Problem]]:
    """Rows by NFC subject id, and the problems of the rows left out."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: classes file does not exist; pass --classes with a CSV of subject_id,class_noun")
    first, lines = _table_lines(path)
    reader = csv.reader(lines)
    columns = _check_header(path, next(reader, None))
    raw_rows = [(first + reader.line_num, row) for row in reader]
    rows: dict[str, list[ClassRow]] = {}
    problems: list[Problem] = []
    for line, values in raw_rows:
        if not any(v.strip() for v in values):
            continue
        where = f"{path} line {line}"
        if len(values) != len(columns):
            problems.append(Problem(values[0] if values else None,
                                    f"{where}: {len(values)} values for {len(columns)} columns; row skipped", True))
            continue
        record = {c: v.strip() for c, v in zip(columns, values, strict=True)}
        sid = unicodedata.normalize("NFC", record["subject_id"])
        try:
            validate_subject_id(sid, where=where)
            if not record["class_noun"]:
                raise DataError(f"{where}: subject {sid!r} has an empty class_noun; give its class, e.g. 'dog'")
            fields = {c: _parse_value(c, v, f"{where} (subject {sid!r})") for c, v in record.items()}
        except DataError as e:
            problems.append(Problem(sid, str(e), refused=True))
            continue
        fields["subject_id"] = sid
        rows.setdefault(sid, []).append(ClassRow(line, fields))
    unique: dict[str, ClassRow] = {}
    for sid, found in rows.items():
        if len(found) > 1:
            lines = ", ".join(str(r.line) for r in found)
            problems.append(Problem(sid, f"{path}: duplicate subject id {sid!r} on lines {lines}; keep one row", True))
        else:
            unique[sid] = found[0]
    return unique, problems


def scan_subject_folders(root: str | Path) -> tuple[dict[str, Path], list[Problem]]:
    """Subject folders of ``root`` by NFC id (hidden folders and loose files ignored)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder does not exist; pass --from-folders with one sub-folder per subject")
    found: dict[str, list[Path]] = {}
    problems: list[Problem] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        sid = unicodedata.normalize("NFC", folder.name)
        try:
            validate_subject_id(sid, where=f"folder {folder}")
        except DataError as e:
            problems.append(Problem(sid, str(e) + "; rename the folder", refused=True))
            continue
        found.setdefault(sid, []).append(folder)
    folders = {}
    for sid, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(repr(p.name) for p in paths)
            problems.append(Problem(
                sid, f"{root}: folders {names} are the same subject id {sid!r} after Unicode normalisation "
                "(NFC); rename or merge them", refused=True,
            ))
        else:
            folders[sid] = paths[0]
    return folders, problems


def _ignored_files(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".")
        and p.suffix.lower() not in IMAGE_EXTENSIONS | SIDECAR_EXTENSIONS
    )


def specs_from_folders(root: str | Path, classes: str | Path) -> tuple[list[SubjectSpec], list[Problem]]:
    """One :class:`SubjectSpec` per subject present both as a folder and as a classes.csv row."""
    rows, problems = read_classes_csv(classes)
    folders, folder_problems = scan_subject_folders(root)
    problems += folder_problems
    refused = {p.subject for p in problems if p.refused}
    specs = []
    for sid, folder in folders.items():
        if sid in refused:
            continue
        if sid not in rows:
            problems.append(Problem(
                sid, f"subject {sid!r} (folder {folder}) is not in {classes}; add a row '{sid},<class noun>'", True,
            ))
            continue
        ignored = _ignored_files(folder)
        if ignored:
            problems.append(Problem(sid, f"subject {sid!r}: ignored non-image file(s) in {folder}: {', '.join(ignored)}"))
        fields = dict(rows[sid].fields)
        specs.append(SubjectSpec(files=list_image_files(folder), source=str(folder), **fields))
    for sid, row in rows.items():
        if sid not in folders and sid not in refused:
            problems.append(Problem(
                sid, f"{classes} line {row.line}: subject {sid!r} has no folder {Path(root) / sid}; "
                "add its photos there or remove the row", refused=True,
            ))
    return specs, problems


def build_from_folders(
    root: str | Path,
    classes: str | Path | None,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    overwrite: bool = False,
) -> BuildReport:
    """Build a manifest from ``root/<subject_id>/*.jpg`` and ``classes`` (default ``root/classes.csv``).

    Returns the report (subjects built, every problem); raises DataError if no subject could be built.
    """
    root = Path(root)
    classes = Path(classes) if classes is not None else root / "classes.csv"
    specs, problems = specs_from_folders(root, classes)
    builder = {"kind": "folders", "root": str(root), "classes": str(classes)}
    return build_manifest(specs, out, config, builder=builder, problems=problems, overwrite=overwrite)
