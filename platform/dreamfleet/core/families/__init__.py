"""Model families, one module each: everything that differs between SD, SDXL, Flux, ...

Adding a family is one module defining ``FAMILY`` (a :class:`~.base.Family`) plus its entry in
``MODULES`` and a tiny model in :mod:`dreamfleet.core.tiny` for its tests.
"""

from __future__ import annotations

import functools
import importlib
import json
from pathlib import Path

from dreamfleet.core.errors import ModelError
from dreamfleet.core.families.base import Cond, Family, NoisyBatch, Support, cat_cond, cat_noisy

MODULES = ("sd", "sdxl", "sd3", "flux", "zimage")

__all__ = ["Cond", "Family", "NoisyBatch", "Support", "all_families", "cat_cond", "cat_noisy", "detect", "get_family"]


@functools.cache
def all_families() -> dict[str, Family]:
    return {name: importlib.import_module(f"{__name__}.{name}").FAMILY for name in MODULES}


def get_family(name: str) -> Family:
    families = all_families()
    if name not in families:
        raise ModelError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]


def detect(folder: Path) -> Family:
    """The family of a diffusers folder, from its ``model_index.json`` pipeline class."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelError(
            f"{folder}: not a diffusers model folder (no model_index.json); pass the folder of a "
            "checkout saved with save_pretrained, a hub id, or 'tiny-random'"
        )
    pipeline_class = json.loads(index_path.read_text()).get("_class_name", "")
    for family in all_families().values():
        if pipeline_class in family.pipeline_classes:
            return family
    known = ", ".join(c for f in all_families().values() for c in f.pipeline_classes)
    raise ModelError(
        f"{folder}: its pipeline class {pipeline_class!r} (model_index.json) is not a family dreamfleet "
        f"trains; supported: {known}"
    )
