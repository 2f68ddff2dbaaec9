"""Typed config dataclasses shared by the CLI, manifests and recipes.

Each component declares a dataclass whose fields carry their help text
(``cfg(default, "help")``) and whose ``__post_init__`` checks values and their
combinations. The CLI flags, manifest overrides and JSON/YAML recipes all resolve to
the same objects through :func:`from_dict` and :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from dreamfleet.core.errors import ConfigError

T = TypeVar("T")


def cfg(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text; mutable defaults are wrapped in a factory."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (recorded in every artifact)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{name}' must not be empty")
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"config field '{name}' is {value!r}; choose one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' must be a list, got {type(value).__name__}")
        items = [_coerce(name, item_tp, v) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config field '{name}' must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
        try:
            number = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}' must be {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field '{name}' must be a whole number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{name}' must be a string, got {type(value).__name__}")
        return value
    if tp is Path:
        return Path(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where=name)
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
    """Build ``cls`` from a mapping, refusing unknown keys and coercing types."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}unknown config field(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known fields: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(f"{where}.{k}" if where else k, hints[k], v) for k, v in data.items()}
    return cls(**kwargs)


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per dataclass field; unset flags stay ``None`` so that
    recipe files and defaults are only overridden by what the user typed."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, _ = _strip_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        help_text = field_help(f) + (f" (default: {default})" if default not in (None, "", [], ()) else "")
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif get_origin(tp) is Literal:
            group.add_argument(flag, dest=f.name, choices=get_args(tp), default=None, help=help_text)
        elif get_origin(tp) in (list, tuple):
            group.add_argument(flag, dest=f.name, default=None, metavar="A,B,...", help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(tp, "VALUE")
            group.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_text)


def add_arguments_later(parser: argparse.ArgumentParser, load: Callable[[], list[type]]) -> None:
    """:func:`add_arguments` for the dataclasses ``load()`` imports from a module that imports torch:
    on a parser that can wait (the CLI's ``CommandParser``), only once its sub-command is parsed, so
    that `dreamfleet --help` imports none of them; on any other parser, now."""

    def add(p: argparse.ArgumentParser) -> None:
        for cls in load():
            add_arguments(p, cls)

    if hasattr(parser, "later"):
        parser.later(add)
    else:
        add(parser)


def overrides_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that the user set on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a JSON or YAML recipe file into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            import json

            data = json.loads(text)
    except Exception as e:  # parse errors of either format
        raise ConfigError(f"recipe file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe file {path} must hold a mapping of config fields at the top level")
    return data
