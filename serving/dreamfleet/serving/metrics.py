"""Serving metrics in Prometheus text format, also exported through Ray's metrics agent.

Every answer of a generation route is counted, by status: ``outcome`` is ``ok`` (2xx),
``rejected`` (4xx: bad key, unknown subject, invalid body, rate limit) or ``error`` (5xx).
The HTTP middleware in :mod:`dreamfleet.serving.app` records them, so answers FastAPI gives
before a handler runs (401, 422) count too. The latency percentiles of the last five minutes
are exported exactly, beside the histogram, for readers of ``/metrics`` alone (the dashboard).
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.175, 0.25, 0.35, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 4, 5, 7.5, 10, 15, 20,
           30, 60, 120, 300, 600)
ROUTES = {"/v1/generate": "generate", "/v1/images/generations": "openai", "/v1/profusion/jobs": "profusion"}
WINDOW_S = 300


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dreamfleet_requests", "answers of the generation routes: outcome ok (2xx), "
                                "rejected (4xx) or error (5xx), and the status code", ["route", "outcome", "code"],
                                registry=r)
        self.quantiles = Gauge("dreamfleet_request_latency_recent_seconds", "latency quantiles of the successful "
                               f"requests of the last {WINDOW_S} s", ["quantile"], registry=r)
        self.latency = Histogram("dreamfleet_request_latency_seconds", "end-to-end latency of successful requests",
                                 ["route"], buckets=BUCKETS, registry=r)
        self.images = Counter("dreamfleet_images", "images generated", registry=r)
        self.cache = Counter("dreamfleet_expert_cache", "where the expert was found: hit (loaded on the replica), "
                             "host (host-memory cache) or disk", ["result"], registry=r)
        self.loaded = Gauge("dreamfleet_replica_loaded_experts", "experts loaded on a replica", ["replica"], registry=r)
        self.loads = Gauge("dreamfleet_replica_loads", "expert loads of a replica, by source", ["replica", "source"],
                           registry=r)
        self.evictions = Gauge("dreamfleet_replica_evictions", "experts evicted from a replica", ["replica"], registry=r)
        self._replicas: dict[str, dict[str, Any]] = {}
        self._recent: list[tuple[float, float]] = []  # (time, latency) of recent successful requests
        self._lock = threading.Lock()
        try:  # also visible in Ray's own Prometheus endpoint and dashboard
            from ray.util import metrics as ray_metrics

            self._ray_requests = ray_metrics.Counter("dreamfleet_serve_requests", "requests", tag_keys=("route",))
        except Exception:
            self._ray_requests = None

    _process: ServingMetrics | None = None

    @classmethod
    def for_process(cls) -> ServingMetrics:
        """The ingress process's metrics, shared by its routes and its HTTP middleware."""
        if cls._process is None:
            cls._process = cls()
        return cls._process

    def record(self, path: str, status: int, seconds: float) -> None:
        """One answer of a route; only the generation routes (``ROUTES``) are counted."""
        route = ROUTES.get(path)
        if route is None:
            return
        outcome = "ok" if status < 400 else ("rejected" if status < 500 else "error")
        self.requests.labels(route, outcome, str(status)).inc()
        if outcome != "ok":
            return
        self.latency.labels(route).observe(seconds)
        with self._lock:
            self._recent.append((time.time(), seconds))
            self._recent = self._recent[-5000:]
        if self._ray_requests is not None:
            self._ray_requests.inc(tags={"route": route})

    def _count(self, outcome: str) -> float:
        return sum(s.value for metric in self.requests.collect() for s in metric.samples
                   if s.name.endswith("_total") and s.labels.get("outcome") == outcome)

    def generation(self, reply: dict[str, Any], n_images: int) -> None:
        self.images.inc(n_images)
        self.cache.labels(reply.get("cache", "unknown")).inc()
        replica, stats = reply.get("replica", "?"), reply.get("stats", {})
        self.loaded.labels(replica).set(len(reply.get("loaded", [])))
        self.loads.labels(replica, "disk").set(stats.get("loads_disk", 0))
        self.loads.labels(replica, "host").set(stats.get("loads_host", 0))
        self.evictions.labels(replica).set(stats.get("evictions", 0))
        with self._lock:
            self._replicas[replica] = {"loaded": reply.get("loaded", []), "stats": stats, "seen_at": time.time()}

    def render(self) -> bytes:
        for q, ms in (("0.5", self._pct(0.5)), ("0.99", self._pct(0.99))):
            if ms is not None:
                self.quantiles.labels(q).set(ms / 1000)
        return generate_latest(self.registry)

    def _pct(self, p: float) -> float | None:
        """The p-quantile (ms) of the successful requests of the last ``WINDOW_S`` seconds."""
        with self._lock:
            lat = sorted(lat for t, lat in self._recent if t > time.time() - WINDOW_S)
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            window = [t for t, _ in self._recent if t > time.time() - 60]
            replicas = copy.deepcopy(self._replicas)

        hits = {k: self.cache.labels(k)._value.get() for k in ("hit", "host", "disk")}
        total = sum(hits.values())
        return {
            "replicas": replicas,
            "requests_ok": self._count("ok"), "requests_rejected": self._count("rejected"),
            "requests_error": self._count("error"),
            "rate_per_min": len(window),
            "p50_ms": self._pct(0.5), "p99_ms": self._pct(0.99),
            "cache": hits, "cache_hit_rate": round(hits["hit"] / total, 3) if total else None,
        }
