"""The dashboard's config: one dataclass for `dreamfleet dashboard` flags and the Serve deployment."""

from __future__ import annotations

from dataclasses import dataclass

from dreamfleet.core.config import cfg
from dreamfleet.core.errors import ConfigError


@dataclass
class DashboardConfig:
    registry: str = cfg("", "registry folder or URI to watch")
    host: str = cfg("127.0.0.1", "HTTP bind address")
    port: int = cfg(8266, "HTTP port")
    address: str | None = cfg(None, "Ray cluster address, for job states and cancelling runs (default: RAY_ADDRESS)")
    ray_dashboard: str | None = cfg(None, "URL of Ray's dashboard, linked from every page (default: the cluster's own, else "
                                              "http://<address host>:8265, when it answers)")
    serve_url: str | None = cfg(None, "base URL of `dreamfleet serve`, for the serving page (e.g. http://127.0.0.1:8000)")
    serve_key: str | None = cfg(None, "API key the dashboard sends to --serve-url (default: the browser's key)")
    keys: str | None = cfg(None, "API keys file (default: <registry>/serving/keys.json on a local registry)")
    insecure: bool = cfg(False, "allow binding a non-loopback address without API keys")
    poll_s: float = cfg(2.0, "how often the pages refresh their data")
    apprentices: list[str] = cfg([], "apprentice folders for the Apprentice page (`dreamfleet apprentice train --out`)")
    demo_sets: list[str] = cfg([], "demonstration sets for the Apprentice page (`dreamfleet apprentice gather --out`)")
    in_serve: bool = cfg(False, "set for the copy `dreamfleet serve` mounts at /dashboard (its pages name serve's flags)")

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if self.poll_s < 0.2:
            raise ConfigError(f"poll_s must be at least 0.2 seconds, got {self.poll_s}")
        if self.serve_url and not self.serve_url.startswith(("http://", "https://")):
            raise ConfigError(f"serve_url must be an http(s) URL, got {self.serve_url!r}")
