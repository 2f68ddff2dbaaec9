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


# Every package folder sits on a floor; a module imports only packages on lower floors (and its
# own). The control plane is on top; core at the bottom never imports anything of dreamfleet's
# above it (the toy model registers itself as an entry point: pyproject.toml).
FLOORS = {
    "core": 0,
    "data": 1, "registry": 1,
    "trainers": 2, "serving": 2,
    "toy": 3,
    "eval": 4,
    "control": 5, "dashboard": 5,
    "cli": 6,
}
SOURCES = [REPO / "platform" / "dreamfleet", REPO / "trainers" / "dreamfleet", REPO / "serving" / "dreamfleet"]


def _modules() -> dict[str, Path]:
    """dreamfleet.<package>.<module> -> file, for every module of the namespace package."""
    out = {}
    for root in SOURCES:
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(("dreamfleet", *parts)).removesuffix(".__init__")] = path
    return out


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def upward_imports(floors: dict[str, int] = FLOORS) -> list[str]:
    bad = []
    for name, path in _modules().items():
        package = name.split(".")[1]
        for m in _imports(path):
            target = m.split(".")[1] if m.startswith("dreamfleet.") else None
            if target and target != package and floors.get(target, 99) >= floors[package]:
                bad.append(f"{_rel(path)} ({package}, floor {floors[package]}) imports {m} "
                           f"({target}, floor {floors.get(target, '?')})")
    return bad


def test_every_package_folder_has_a_floor():
    folders = {p.name for root in SOURCES for p in root.iterdir() if p.is_dir() and any(p.rglob("*.py"))}
    assert folders == set(FLOORS), f"assign these to a floor in FLOORS: {sorted(folders ^ set(FLOORS))}"


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports that point up a floor:\n" + "\n".join(bad)


def test_core_importing_toy_is_caught(tmp_path, monkeypatch):
    """The check itself: core importing the toy world (as it once did) is reported."""
    fake = tmp_path / "core" / "models_with_toy.py"
    fake.parent.mkdir()
    fake.write_text("from dreamfleet.toy.model import load_toy\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCES", [tmp_path, *SOURCES])
    assert any("core" in b and "dreamfleet.toy.model" in b for b in upward_imports())


def test_no_import_cycles_between_modules():
    """No two modules import each other, directly or through others (function-level imports count)."""
    modules = _modules()
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt):], node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
