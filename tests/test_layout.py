"""The package layout: one namespace import root, no `platform` package, one-way dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_is_not_shadowed():
    import platform

    assert platform.system()
    assert Path(platform.__file__).parent != REPO / "platform"
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_from_repo_root_subprocess():
    # `python -m pytest` from the root puts the root on sys.path: `platform/` must not win.
    out = subprocess.run(
        [sys.executable, "-c", "import platform, uuid; print(platform.system()); print(platform.__file__)"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert out[0] and not out[1].startswith(str(REPO / "platform"))


def test_dreamfleet_is_one_namespace_over_component_folders():
    import dreamfleet

    roots = {Path(p).parent.name for p in dreamfleet.__path__}
    assert {"platform", "trainers", "serving"} <= roots
    for folder in ("platform", "trainers", "serving"):
        assert not (REPO / folder / "dreamfleet" / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


CONTROL_PLANE = ("dreamfleet.cli", "dreamfleet.control", "dreamfleet.dashboard")


def test_dependencies_point_one_way():
    bad = []
    for layer in ("trainers", "serving"):
        for path in (REPO / layer).rglob("*.py"):
            bad += [f"{path.relative_to(REPO)} imports {m}" for m in _imports(path) if m.startswith(CONTROL_PLANE)]
    for path in (REPO / "platform" / "dreamfleet" / "core").rglob("*.py"):
        bad += [
            f"{path.relative_to(REPO)} imports {m}"
            for m in _imports(path)
            if m.startswith(("dreamfleet.trainers", "dreamfleet.serving", *CONTROL_PLANE))
        ]
    assert not bad, "lower layers import upper layers:\n" + "\n".join(bad)
