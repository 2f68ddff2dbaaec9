"""The DreamBench manifest: 30 subjects, their class nouns, the 25 evaluation prompts, the licences.

Reads the benchmark folder (``../shared/dreambench``: ``<subject>/NN.jpg``,
``prompts_and_classes.txt``, ``references_and_licenses.txt``) and builds a manifest whose
rows carry the object or the live-subject prompt list (live subjects are those whose class
noun is in ``live_classes``: the 9 cats and dogs), and whose ``licenses/`` folder keeps the
benchmark's licence text beside the shards. The recipe is ``manifests/dreambench/recipe.yaml``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from dreamfleet.core.config import cfg
from dreamfleet.core.errors import DataError
from dreamfleet.core.images import list_image_files
from dreamfleet.data.build import BuildConfig, BuildReport, Problem, SubjectSpec, build_manifest

PROMPTS_FILE = "prompts_and_classes.txt"
REFERENCES_FILE = "references_and_licenses.txt"
NUM_PROMPTS = 25
UNSPLASH_LICENCE = "Unsplash License (https://unsplash.com/license)"


@dataclass
class DreamBenchConfig:
    """How the DreamBench manifest is built (the recipe file resolves to this)."""

    build: BuildConfig = dataclasses.field(default_factory=BuildConfig, metadata={"help": "image and shard options"})
    identifier: str | None = cfg(None, "rare-token identifier written into every row (None: the trainer's default)")
    live_classes: list[str] = cfg(["cat", "dog"], "class nouns of the live subjects, which get the live-subject prompts")
    tenant: str | None = cfg("dreambench", "owner recorded in the tenant column")


@dataclass
class BenchmarkText:
    classes: dict[str, str]
    object_prompts: list[str]
    live_prompts: list[str]


def _section(lines: list[str], title: str, path: Path) -> list[str]:
    """The lines after the heading ``title`` up to the next heading or the end."""
    headings = {"Classes", "Prompts", "Object Prompts", "Live Subject Prompts"}
    try:
        start = lines.index(title) + 1
    except ValueError:
        raise DataError(f"{path}: no '{title}' section; is this DreamBench's {PROMPTS_FILE}?") from None
    end = next((i for i in range(start, len(lines)) if lines[i] in headings), len(lines))
    return lines[start:end]


def _prompts(lines: list[str], title: str, path: Path) -> list[str]:
    prompts = re.findall(r"'(.*?)'\.format\(unique_token, class_token\)", "\n".join(_section(lines, title, path)))
    if len(prompts) != NUM_PROMPTS:
        raise DataError(f"{path}: '{title}' has {len(prompts)} prompts, expected {NUM_PROMPTS}")
    return prompts


def read_prompts_and_classes(path: str | Path) -> BenchmarkText:
    """Class noun per subject and the two prompt lists (templates with {0} identifier, {1} class noun)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass the DreamBench folder (it holds {PROMPTS_FILE})")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    classes = {}
    for line in _section(lines, "Classes", path):
        if not line or line == "subject_name,class":
            continue
        subject, _, noun = line.partition(",")
        if not noun:
            raise DataError(f"{path}: class line {line!r} is not 'subject_name,class'")
        classes[subject.strip()] = noun.strip()
    return BenchmarkText(classes, _prompts(lines, "Object Prompts", path), _prompts(lines, "Live Subject Prompts", path))


def read_references(path: str | Path, subjects: set[str]) -> dict[str, dict[str, str]]:
    """Per subject: 'credit' (the line after the name) and one entry per listed image number."""
    refs: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line == "Licenses":
            break
        name, sep, rest = line.partition(":")
        if sep and name in subjects:
            current = refs.setdefault(name, {"credit": rest.strip()})
        elif current is not None and re.fullmatch(r"\d\d", name):
            current[name] = rest.strip()
        elif current is not None and line.startswith("(credit:"):
            current["credit"] = line.strip("()").removeprefix("credit:").strip()
    return refs


def _licence(refs: dict[str, str]) -> str:
    if any("unsplash.com/photos" in v for v in refs.values()):
        return f"{UNSPLASH_LICENCE}; credit: {refs['credit']}" if refs.get("credit") else UNSPLASH_LICENCE
    who = (refs.get("credit") or "Photos by the DreamBooth authors").rstrip(".")
    return f"{who}. Use, modification and distribution permitted to the DreamBooth authors (licenses/{REFERENCES_FILE})"


def dreambench_specs(src: str | Path, config: DreamBenchConfig) -> tuple[list[SubjectSpec], list[Problem]]:
    src = Path(src)
    text = read_prompts_and_classes(src / PROMPTS_FILE)
    refs = read_references(src / REFERENCES_FILE, set(text.classes)) if (src / REFERENCES_FILE).is_file() else {}
    specs, problems = [], []
    for sid, noun in text.classes.items():
        folder = src / sid
        if not folder.is_dir():
            problems.append(Problem(sid, f"subject {sid!r}: folder {folder} is missing from DreamBench", True))
            continue
        live = noun in config.live_classes
        subject_refs = refs.get(sid, {})
        licence = _licence(subject_refs)
        files = list_image_files(folder)
        sample_meta = {
            f.name: {"source": f"dreambench/{sid}/{f.name}", "reference": subject_refs.get(f.stem), "licence": licence}
            for f in files
        }
        specs.append(SubjectSpec(
            subject_id=sid, class_noun=noun, files=files, identifier=config.identifier, tenant=config.tenant,
            eval_prompts=text.live_prompts if live else text.object_prompts, live_subject=live,
            licence=licence, source=f"dreambench/{sid}", sample_meta=sample_meta,
        ))
    return specs, problems


def build_dreambench(
    src: str | Path, out: str | Path, config: DreamBenchConfig | None = None, *, overwrite: bool = False
) -> BuildReport:
    """Build the DreamBench manifest from the benchmark folder ``src`` into ``out``."""
    config = config or DreamBenchConfig()
    src = Path(src)
    specs, problems = dreambench_specs(src, config)
    licence_files = [p for p in (src / REFERENCES_FILE, src / "README.md") if p.is_file()]
    builder = {
        "kind": "dreambench", "source": str(src), "identifier": config.identifier,
        "live_classes": list(config.live_classes), "tenant": config.tenant,
    }
    return build_manifest(
        specs, out, config.build, builder=builder, problems=problems, licence_files=licence_files, overwrite=overwrite
    )
