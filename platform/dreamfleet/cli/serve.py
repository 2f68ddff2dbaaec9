"""`dreamfleet serve` and `dreamfleet keys`."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from typing import Any

from dreamfleet.core import config as C

log = logging.getLogger("dreamfleet")


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.serving.config import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve every expert of a registry over HTTP with Ray Serve",
        description=(
            "Starts (or deploys to --address) a Ray Serve application that generates images with the "
            "experts of --registry: POST /v1/generate, POST /v1/images/generations (OpenAI-compatible), "
            "GET /v1/subjects, /healthz, /metrics. Without API keys (see `dreamfleet keys`) it only binds "
            "a loopback address unless --insecure is given."
        ),
    )
    p.add_argument("--address", help="Ray cluster address (default: an embedded local Ray)")
    p.add_argument("--detach", action="store_true", help="deploy and return (the app keeps running on the cluster)")
    C.add_arguments(p, ServeConfig)
    p.set_defaults(handler=run_serve)

    k = sub.add_parser("keys", help="create, list or revoke API keys of the serving layer")
    ksub = k.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant; the key is printed once")
    kc.add_argument("--registry", required=True)
    kc.add_argument("--keys", help="keys file (default: <registry>/serving/keys.json)")
    kc.add_argument("--tenant", help="the tenant (owner) whose subjects this key may use")
    kc.add_argument("--admin", action="store_true", help="a key that may use every subject")
    kc.add_argument("--name", default="", help="a label, e.g. the client's name")
    kc.add_argument("--rate-per-min", type=float, default=None,
                    help="requests a minute this key may send, in a bucket of its own (default: the tenant's "
                         "bucket at the server's --rate-limit-per-min)")
    kc.set_defaults(handler=run_keys_create)
    kl = ksub.add_parser("list", help="key ids, tenants and state (never the keys themselves)")
    kl.add_argument("--registry", required=True)
    kl.add_argument("--keys")
    kl.set_defaults(handler=run_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key by id (takes effect without a restart)")
    kr.add_argument("key_id")
    kr.add_argument("--registry", required=True)
    kr.add_argument("--keys")
    kr.set_defaults(handler=run_keys_revoke)


def _store(args):
    from dreamfleet.serving.auth import KeyStore

    return KeyStore(args.keys or _registry_keys_path(args.registry))


def _registry_keys_path(registry: str):
    """<registry>/serving/keys.json of a registry that is there: a mistyped --registry must not
    create a keys file that no server reads."""
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.serving.auth import default_keys_path

    path = default_keys_path(registry)
    root = path.parent.parent
    if not (root / "registry.json").is_file():
        raise ConfigError(f"no registry at {root} (no registry.json there): check --registry, or pass "
                          "--keys FILE to keep the keys file elsewhere")
    return path


def run_keys_create(args: argparse.Namespace) -> int:
    key, token = _store(args).create(args.tenant, admin=args.admin, name=args.name, rate_per_min=args.rate_per_min)
    print(token)
    print(f"key id {key.id}, tenant {key.tenant or '-'}{', admin' if key.admin else ''}: "
          "store the key now, it is not shown again", flush=True)
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    for key in _store(args).list_keys():
        rate = f"{key.rate_per_min:g}/min" if key.rate_per_min is not None else "server's"
        print(f"{key.id}  tenant={key.tenant or '-'}  admin={key.admin}  rate={rate}  revoked={key.revoked}  "
              f"created={key.created_at}  {key.name}")
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    key = _store(args).revoke(args.key_id)
    print(f"revoked {key.id} (tenant {key.tenant or '-'})")
    return 0


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_binding(cfg) -> None:
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.serving.auth import keys_for

    keys = keys_for(cfg.keys, cfg.registry)
    if not keys.enabled and not is_loopback(cfg.host) and not cfg.insecure:
        raise ConfigError(
            f"refusing to serve on {cfg.host} without API keys: anyone who reaches it could generate with "
            "every subject. Create keys (`dreamfleet keys create --registry ... --tenant ...`), bind "
            "127.0.0.1, or pass --insecure"
        )


def serve_config(args: dict[str, Any]):
    """A checked ServeConfig from a RayService application's ``args`` (the `serve` flags' names)."""
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.registry import Registry
    from dreamfleet.serving.config import ServeConfig

    cfg = C.from_dict(ServeConfig, dict(args or {}), where="serve application args")
    if not cfg.registry:
        raise ConfigError("serve application args: 'registry' is required (the registry whose experts to serve)")
    cfg.registry = Registry(cfg.registry, create=False).uri
    check_binding(cfg)
    return cfg


def application(args: dict[str, Any]):
    """The generation API as a Ray Serve application builder, for a RayService's
    ``serveConfigV2`` (``import_path: dreamfleet.cli.serve:application``) or ``serve run``."""
    from dreamfleet.control.profusion_jobs import jobs_deployment
    from dreamfleet.serving.app import build_app

    cfg = serve_config(args)
    return build_app(cfg, jobs=jobs_deployment(cfg))


def dashboard_application(args: dict[str, Any]):
    """The dashboard beside it (``import_path: dreamfleet.cli.serve:dashboard_application``)."""
    from dreamfleet.dashboard.server import dashboard_for_serve

    args = dict(args or {})
    address = args.pop("address", None)
    return dashboard_for_serve(serve_config(args), address=address)


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. Ray's HTTP proxy binds with SO_REUSEPORT, so a
    second embedded `dreamfleet serve` would otherwise start on the same port and the two would
    split the traffic."""
    from dreamfleet.core.errors import ConfigError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"port {port} on {host} is in use ({e.strerror}): another server (a running "
                              "`dreamfleet serve`?) listens there; stop it or pass another --port") from None


def start(cfg, *, address: str | None = None, detach: bool = True):
    """Deploy the app on Ray Serve; returns the base URL."""
    import ray
    from ray import serve

    from dreamfleet.control.cluster import connect_ray
    from dreamfleet.serving.app import build_app, start_serve

    if not ray.is_initialized():
        if address is None:  # an embedded Ray starts its own HTTP proxy here
            check_port_free(cfg.host, cfg.port)
        connect_ray(address)
    start_serve(cfg.host, cfg.port)
    from dreamfleet.control.profusion_jobs import jobs_deployment

    serve.run(build_app(cfg, jobs=jobs_deployment(cfg)), name="dreamfleet", route_prefix="/", blocking=False)
    from dreamfleet.dashboard.server import dashboard_for_serve

    serve.run(dashboard_for_serve(cfg, address=address), name="dashboard", route_prefix="/dashboard", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"


def run_serve(args: argparse.Namespace) -> int:
    import time

    from dreamfleet.registry import Registry
    from dreamfleet.serving.config import ServeConfig

    cfg = C.from_dict(ServeConfig, C.overrides_from_args(ServeConfig, args))
    if not cfg.registry:
        from dreamfleet.core.errors import ConfigError

        raise ConfigError("pass --registry: the registry whose experts to serve")
    cfg.registry = Registry(cfg.registry, create=False).uri
    check_binding(cfg)
    url = start(cfg, address=args.address)
    print(f"serving {cfg.registry} at {url} (API docs {url}/docs, dashboard {url}/dashboard/, "
          f"metrics {url}/metrics)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0
