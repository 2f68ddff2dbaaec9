"""Serving metrics in Prometheus text format, also exported through Ray's metrics agent."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dreamfleet_requests", "generation requests", ["route", "outcome"], registry=r)
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

    def observe(self, route: str, seconds: float) -> None:
        self.requests.labels(route, "ok").inc()
        self.latency.labels(route).observe(seconds)
        with self._lock:
            self._recent.append((time.time(), seconds))
            self._recent = self._recent[-5000:]
        if self._ray_requests is not None:
            self._ray_requests.inc(tags={"route": route})

    def failure(self, route: str) -> None:
        self.requests.labels(route, "error").inc()

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
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            recent = [lat for t, lat in self._recent if t > time.time() - 300]
            window = [t for t, _ in self._recent if t > time.time() - 60]
        lat = sorted(recent)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

        hits = {k: self.cache.labels(k)._value.get() for k in ("hit", "host", "disk")}
        total = sum(hits.values())
        return {
            "replicas": self._replicas,
            "requests_ok": sum(self.requests.labels(r, "ok")._value.get() for r in ("generate", "openai")),
            "requests_error": sum(self.requests.labels(r, "error")._value.get() for r in ("generate", "openai")),
            "rate_per_min": len(window),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "cache": hits, "cache_hit_rate": round(hits["hit"] / total, 3) if total else None,
        }
