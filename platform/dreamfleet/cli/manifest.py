"""`dreamfleet manifest build|show|validate`: subject manifests (shards plus Parquet index)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamfleet.core import config as C
from dreamfleet.core.errors import DataError


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.data.build import BuildConfig

    p = sub.add_parser("manifest", help="build, inspect and check subject manifests")
    msub = p.add_subparsers(dest="manifest_command", metavar="ACTION", required=True)

    b = msub.add_parser(
        "build",
        help="build shards plus index from one folder per subject, or from DreamBench",
        description=(
            "Builds a manifest: WebDataset shards of subject photos (normalised: EXIF rotation, RGB, "
            "longest side capped) and a Parquet index with one row per subject. Bad photos are skipped "
            "with a warning, a subject left with fewer than --min-images photos is refused, and the "
            "others still build; every problem is listed at the end. Exit 0 when a manifest was "
            "written (1 with --strict if anything was skipped), 2 when nothing could be built."
        ),
    )
    source = b.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-folders", type=Path, metavar="ROOT", help="folder with one sub-folder of photos per subject")
    source.add_argument("--dreambench", type=Path, metavar="DIR", help="the DreamBench folder (e.g. ../shared/dreambench)")
    b.add_argument("--classes", type=Path, help="CSV with subject_id,class_noun,... (default: ROOT/classes.csv)")
    b.add_argument("--out", required=True, type=Path, help="manifest folder to write")
    b.add_argument(
        "--config", type=Path,
        help="JSON/YAML recipe: build options, or for --dreambench a DreamBench recipe such as "
        "manifests/dreambench/recipe.yaml; flags override it",
    )
    b.add_argument("--overwrite", action="store_true", help="replace an existing manifest at --out")
    b.add_argument("--strict", action="store_true", help="exit 1 if any photo or subject was skipped")
    C.add_arguments(b, BuildConfig)
    b.set_defaults(handler=run_build)

    s = msub.add_parser("show", help="print a summary table of a manifest")
    s.add_argument("manifest", help="manifest folder or URI (s3://, gs://, file://)")
    s.add_argument("--subject", help="print every field of this subject instead of the table")
    s.add_argument("--limit", type=int, default=50, help="rows of the table to print (0: all)")
    s.set_defaults(handler=run_show)

    v = msub.add_parser("validate", help="read every image of a manifest and report every problem")
    v.add_argument("manifest", help="manifest folder or URI (s3://, gs://, file://)")
    v.add_argument("--min-side", type=int, default=0, help="also report images whose shorter side is below this")
    v.set_defaults(handler=run_validate)


def run_build(args: argparse.Namespace) -> int:
    from dreamfleet.data.build import BuildConfig
    from dreamfleet.data.dreambench import DreamBenchConfig, build_dreambench
    from dreamfleet.data.folders import build_from_folders

    data = C.load_recipe(args.config) if args.config else {}
    overrides = C.overrides_from_args(BuildConfig, args)
    if args.dreambench:
        data["build"] = {**data.get("build", {}), **overrides}
        report = build_dreambench(args.dreambench, args.out, C.from_dict(DreamBenchConfig, data), overwrite=args.overwrite)
    else:
        config = C.from_dict(BuildConfig, {**data, **overrides})
        report = build_from_folders(args.from_folders, args.classes, args.out, config, overwrite=args.overwrite)
    print(report.format())
    print(f"({report.seconds:.1f} s; `dreamfleet manifest show {args.out}` for the table)")
    return 1 if args.strict and report.problems else 0


def _cell(value: object) -> str:
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_show(args: argparse.Namespace) -> int:
    import json

    from dreamfleet.data.manifest import Manifest

    m = Manifest.open(args.manifest)
    if args.subject:
        record = m.record(args.subject)
        print(json.dumps(record.to_row() | {"train_overrides": record.train_overrides}, indent=2, ensure_ascii=False))
        return 0
    info = m.info
    records = m.records()
    shards = info.get("shards", [])
    code = info.get("code_version", {})
    commit = (code.get("git_commit") or "")[:10]
    print(f"manifest {m.root} (format version {m.version}, built {info.get('created', '?')} by dreamfleet "
          f"{code.get('package', '?')}{' ' + commit if commit else ''}, from {info.get('builder', {}).get('kind', '?')})")
    print(f"{len(records)} subjects, {sum(r.num_images for r in records)} images, {len(shards)} shard(s), "
          f"{_size(sum(s['bytes'] for s in shards))}; content hash {info.get('content_hash', '?')[:16]}")
    if info.get("licence_files"):
        print(f"licences: {', '.join(info['licence_files'])}")
    header = ["subject_id", "class_noun", "images", "identifier", "tenant", "live", "method", "steps", "lr",
              "prompts", "shard", "size"]
    shown = records if args.limit <= 0 else records[: args.limit]
    rows = [
        [r.subject_id, r.class_noun, str(r.num_images), _cell(r.identifier), _cell(r.tenant), _cell(r.live_subject),
         _cell(r.method), _cell(r.steps), _cell(r.learning_rate), str(len(r.eval_prompts)),
         ",".join(Path(s).stem for s in r.shards), _size(r.num_bytes)]
        for r in shown
    ]
    print(_table(header, rows))
    if len(shown) < len(records):
        print(f"... and {len(records) - len(shown)} more (--limit 0 prints all)")
    refused = info.get("refused", {})
    if refused:
        print(f"{len(refused)} subject(s) refused at build time: {', '.join(sorted(refused))}")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from dreamfleet.data.manifest import Manifest

    m = Manifest.open(args.manifest)
    try:
        problems = m.validate(min_side=args.min_side)
    except DataError as e:  # the index itself cannot be read
        problems = [str(e)]
    records = m.records()
    images = sum(r.num_images for r in records)
    if not problems:
        print(f"ok: {len(records)} subjects, {images} images, every shard range matches its hash and decodes")
        return 0
    for p in problems:
        print(f"- {p}")
    print(f"{len(problems)} problem(s) in manifest {m.root} ({len(records)} subjects, {images} images)")
    return 1
