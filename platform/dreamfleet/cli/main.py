"""`dreamfleet` command line.

Each sub-command lives in its own module of this package with a ``register(subparsers)``
function; heavy imports (torch, diffusers, ray) happen inside the handlers, and the flags of
config dataclasses that live in such modules are added only when their sub-command is parsed
(:func:`dreamfleet.core.config.add_arguments_later`), so that ``--help`` stays instant. User
mistakes (:class:`DreamfleetError`) print one clear message and exit 2, without a stack trace.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from dreamfleet.core.errors import DreamfleetError

# Sub-command modules, in --help order. A missing module (a component not installed) is skipped.
COMMAND_MODULES = ("train", "fleet", "manifest", "serve", "dashboard", "eval", "apprentice", "profusion", "demo", "toy")


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: what is handed to ``later`` runs when this sub-command is the one
    parsed (or its --help shown), not when the parser is built."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._later: list[Callable[[argparse.ArgumentParser], None]] = []

    def later(self, add: Callable[[argparse.ArgumentParser], None]) -> None:
        self._later.append(add)

    def parse_known_args(self, args=None, namespace=None):
        while self._later:
            self._later.pop(0)(self)
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreamfleet",
        description="Fleet-scale DreamBooth: train, register and serve per-subject experts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, with Ray's own logs and Ray Data's progress")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dreamfleet.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dreamfleet.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # bitsandbytes warns on import that an optional CPU kernel package is missing
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "command", None) != "submit":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.passthrough = extra  # `submit` hands unknown options on to `dreamfleet train`
    setup_logging(args.verbose)
    if args.verbose:  # Ray's own logs and Ray Data's progress too (control.cluster.quiet_ray)
        os.environ["DREAMFLEET_VERBOSE"] = "1"
    try:
        return int(args.handler(args) or 0)
    except DreamfleetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dreamfleet ... | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
