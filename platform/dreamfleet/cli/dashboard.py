"""`dreamfleet dashboard`: the operators' web page for runs, subjects, experts and serving."""

from __future__ import annotations

import argparse

from dreamfleet.core import config as C


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.dashboard.config import DashboardConfig

    p = sub.add_parser(
        "dashboard",
        help="web dashboard: runs, subjects, loss curves, sample images and the serving layer",
        description=(
            "Serves a web page that follows the runs and subjects of --registry (states, losses, validation "
            "images, expert versions) and, with --serve-url, the serving layer; it links to Ray's dashboard "
            "for the rest. Read-only by default; cancelling a run, retrying a subject and deleting an expert "
            "need an admin API key when keys exist, and a loopback client when they do not. Without API keys "
            "it only binds a loopback address unless --insecure is given."
        ),
    )
    C.add_arguments(p, DashboardConfig, skip=("in_serve",))
    p.set_defaults(handler=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    from dreamfleet.cli.serve import is_loopback
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.dashboard.config import DashboardConfig
    from dreamfleet.dashboard.server import serve_forever
    from dreamfleet.registry import Registry
    from dreamfleet.serving.auth import keys_for

    cfg = C.from_dict(DashboardConfig, C.overrides_from_args(DashboardConfig, args))
    if not cfg.registry:
        raise ConfigError("pass --registry: the registry to watch")
    cfg.registry = Registry(cfg.registry, create=False).uri
    try:
        keys_on = keys_for(cfg.keys, cfg.registry).enabled
    except ConfigError:
        keys_on = False
    if not keys_on and not is_loopback(cfg.host) and not cfg.insecure:
        raise ConfigError(
            f"refusing to serve the dashboard on {cfg.host} without API keys: anyone who reaches it could read "
            "every subject. Create an admin key (`dreamfleet keys create --registry ... --admin`), bind "
            "127.0.0.1, or pass --insecure"
        )
    print(f"dashboard of {cfg.registry} at http://{cfg.host}:{cfg.port}/", flush=True)
    serve_forever(cfg)
    return 0
