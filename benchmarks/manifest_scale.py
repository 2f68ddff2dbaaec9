"""Manifest at scale: build 10,000 synthetic subjects, then open the index and read one subject.

    .venv/bin/python benchmarks/manifest_scale.py [--subjects 10000] [--images 4] [--repeats 7]

Writes synthetic subject folders (tiny 64x64 PNGs, distinct per image) under --work, builds
the manifest with ``build_from_folders`` (the code path of ``dreamfleet manifest build``),
then, --repeats times, opens the index afresh and reads one random subject, timing it and
counting the bytes read: those the reader took from the shards, and every byte the process
read through system calls (/proc/self/io rchar, so index footer and row group included).
The OS page cache is warm (a laptop or a node re-reading its local disk). Prints the figures
as the markdown section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform as pyplatform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dreamfleet.data.manifest import BuildConfig, Manifest, build_from_folders


def make_folders(root: Path, subjects: int, images: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    lines = ["subject_id,class_noun"]
    for s in range(subjects):
        sid = f"subject{s:06d}"
        (root / sid).mkdir()
        for i in range(images):
            arr = np.empty((64, 64, 3), np.uint8)
            arr[:] = rng.integers(0, 256, 3, dtype=np.uint8)
            y, x = rng.integers(0, 48, 2)
            arr[y : y + 16, x : x + 16] = rng.integers(0, 256, 3, dtype=np.uint8)
            Image.fromarray(arr).save(root / sid / f"{i:02d}.png")
        lines.append(f"{sid},{('dog', 'cat', 'toy', 'backpack')[s % 4]}")
    (root / "classes.csv").write_text("\n".join(lines) + "\n")


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def query(out: Path, subject_id: str) -> tuple[float, int, int]:
    before_io, started = rchar(), time.perf_counter()
    m = Manifest.open(out)
    images = m.read_images(subject_id)
    seconds = time.perf_counter() - started
    total = rchar() - before_io
    assert len(images) == m.record(subject_id).num_images
    return seconds, m.bytes_read, total


def spread(values: list[float], fmt: str) -> str:
    return f"min {fmt.format(min(values))}, median {fmt.format(statistics.median(values))}, max {fmt.format(max(values))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=4, help="images per subject")
    ap.add_argument("--repeats", type=int, default=7, help="subjects read (each after a fresh open)")
    ap.add_argument("--builds", type=int, default=3, help="times the manifest is built")
    ap.add_argument("--shard-size-mb", type=float, default=BuildConfig().shard_size_mb)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-manifest"))
    ap.add_argument("--keep", action="store_true", help="keep the folders and manifest afterwards")
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    src, out = args.work / "subjects", args.work / "manifest"
    t0 = time.perf_counter()
    make_folders(src, args.subjects, args.images, seed=0)
    print(f"wrote {args.subjects} synthetic subject folders in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    config = BuildConfig(shard_size_mb=args.shard_size_mb)
    build_seconds = []
    for _ in range(args.builds):
        report = build_from_folders(src, None, out, config, overwrite=True)
        assert not report.problems, report.format()
        build_seconds.append(report.seconds)
    manifest_bytes, index_bytes, input_bytes = du(out), (out / "index.parquet").stat().st_size, du(src)

    query(out, "subject000000")  # first import of the decoders, not counted
    rng = random.Random(1)
    runs = [query(out, f"subject{rng.randrange(args.subjects):06d}") for _ in range(args.repeats)]
    ms = [r[0] * 1000 for r in runs]
    shard_bytes = [r[1] for r in runs]
    all_bytes = [r[2] for r in runs]

    m = Manifest.open(out)
    cpu = f"{os.cpu_count()}-core CPU ({pyplatform.processor() or pyplatform.machine()})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"""## Manifests: 10,000 subjects

Machine: {cpu}, {mem:.0f} GiB RAM, local disk, page cache warm; Python {pyplatform.python_version()}.
Date: {dt.date.today().isoformat()}. Command (from the repository root):

    .venv/bin/python benchmarks/manifest_scale.py --subjects {args.subjects} --images {args.images} \\
        --repeats {args.repeats} --builds {args.builds} --shard-size-mb {args.shard_size_mb:g}

Input: {args.subjects:,} synthetic subjects x {args.images} images (64x64 PNG, distinct), {input_bytes / 2**20:.1f} MiB
of files. Manifest: {len(m.info['shards'])} shard(s) of at most {args.shard_size_mb:g} MiB plus the index,
{manifest_bytes / 2**20:.1f} MiB in all; the index is {index_bytes / 2**10:.0f} KiB in {m._file.metadata.num_row_groups} row groups.

| figure | value |
|---|---|
| build (`build_from_folders`, one process, {args.builds} builds) | {spread(build_seconds, "{:.1f}")} s ({args.subjects * args.images / statistics.median(build_seconds):,.0f} images/s at the median) |
| open index + read one subject ({args.repeats} random subjects) | {spread(ms, "{:.1f}")} ms |
| bytes read from shards for one subject | {spread(shard_bytes, "{:,.0f}")} B |
| all bytes read by the process (index included) | {spread(all_bytes, "{:,.0f}")} B |
| manifest size | {manifest_bytes:,} B |
| share of the manifest read for one subject | {statistics.median(all_bytes) / manifest_bytes:.4%} (median) |

The shard bytes are the subject's own range and nothing else; the rest of the bytes read is
the index: pyarrow reads the last 64 KiB of the Parquet file to get the footer, then the one
row group whose subject_id statistics cover the subject. Tiny images make the manifest
{manifest_bytes / input_bytes:.0f}x the size of its input: every tar member takes a 512-byte
header and is padded to 512 bytes, about 2 KiB per image with its JSON; with real photos
(100 KiB-1 MiB) the overhead is a few per cent.
""")
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
