"""The serving page's numbers: the serving app's own snapshot, or its Prometheus text.

``GET /v1/serving`` of `dreamfleet serve` gives per-replica detail (the loaded experts). When
it refuses the dashboard (API keys on, no key given), the page falls back to ``GET /metrics``,
which is open: the same counters, with the loaded experts counted rather than named and the
latency percentiles estimated from the histogram buckets.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

LINE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        if m:
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            samples.append((m.group(1), dict(LABEL_RE.findall(m.group(2) or "")), value))
    return samples


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The q-quantile (seconds) from cumulative histogram buckets, interpolated linearly as Prometheus does."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, prev_le, prev_count = q * buckets[-1][1], 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return prev_le


def snapshot_from_metrics(text: str) -> dict[str, Any]:
    """The `/v1/serving` shape, rebuilt from the Prometheus text of `/metrics`."""
    counts = {"ok": 0.0, "rejected": 0.0, "error": 0.0}
    exact: dict[str, float] = {}
    cache = {"hit": 0.0, "host": 0.0, "disk": 0.0}
    buckets: dict[float, float] = {}
    replicas: dict[str, dict[str, Any]] = {}
    for name, labels, value in parse_prometheus(text):
        if name == "dreamfleet_requests_total":
            outcome = labels.get("outcome", "error")
            counts[outcome if outcome in counts else "error"] += value
        elif name == "dreamfleet_request_latency_recent_seconds":
            exact[labels.get("quantile", "")] = value
        elif name == "dreamfleet_expert_cache_total" and labels.get("result") in cache:
            cache[labels["result"]] += value
        elif name == "dreamfleet_request_latency_seconds_bucket":
            le = float(labels.get("le", "inf").replace("+Inf", "inf"))
            buckets[le] = buckets.get(le, 0.0) + value
        elif name.startswith("dreamfleet_replica_") and "replica" in labels:
            rep = replicas.setdefault(labels["replica"], {"loaded": None, "loaded_count": 0, "stats": {}})
            if name == "dreamfleet_replica_loaded_experts":
                rep["loaded_count"] = int(value)
            elif name == "dreamfleet_replica_loads":
                rep["stats"][f"loads_{labels.get('source', '?')}"] = int(value)
            elif name == "dreamfleet_replica_evictions":
                rep["stats"]["evictions"] = int(value)
    pairs = list(buckets.items())
    p50 = exact.get("0.5", _quantile(pairs, 0.5))  # exact over the last 5 minutes, when the server exports them
    p99 = exact.get("0.99", _quantile(pairs, 0.99))
    total = sum(cache.values())
    return {
        "replicas": replicas, "requests_ok": counts["ok"], "requests_rejected": counts["rejected"],
        "requests_error": counts["error"], "rate_per_min": None,
        "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
        "cache": cache, "cache_hit_rate": round(cache["hit"] / total, 3) if total else None,
        "source": "metrics", "note": "from /metrics (pass an admin key for per-replica expert names); "
                                     + ("latency percentiles of the last 5 minutes" if exact
                                        else "latency percentiles estimated from histogram buckets"),
    }


class ServingSource:
    """Where the serving page's numbers come from: a callable in the same process, or a URL."""

    def __init__(self, url: str | None = None, key: str | None = None,
                 snapshot: Callable[[], dict[str, Any]] | None = None, timeout_s: float = 3.0):
        self.url = url.rstrip("/") if url else None
        self.key, self.snapshot, self.timeout_s = key, snapshot, timeout_s
        self._rate: list[tuple[float, float]] = []  # (time, requests) to estimate a rate from counters

    @property
    def configured(self) -> bool:
        return self.snapshot is not None or self.url is not None

    def read(self, authorization: str | None = None) -> dict[str, Any]:
        if self.snapshot is not None:
            return {**self.snapshot(), "available": True, "source": "in-process"}
        if self.url is None:
            return {"available": False,
                    "message": "no serving layer configured: start the dashboard with --serve-url http://HOST:8000, "
                               "or open the one that `dreamfleet serve` mounts at /dashboard"}
        import httpx

        headers = {}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        elif authorization:
            headers["Authorization"] = authorization
        try:
            r = httpx.get(f"{self.url}/v1/serving", headers=headers, timeout=self.timeout_s)
            if r.status_code == 200:
                return {**r.json(), "available": True, "source": "v1/serving", "url": self.url}
            m = httpx.get(f"{self.url}/metrics", timeout=self.timeout_s)
            m.raise_for_status()
        except httpx.HTTPError as e:
            return {"available": False, "url": self.url,
                    "message": f"cannot reach the serving layer at {self.url} ({type(e).__name__}: {e})"}
        snap = snapshot_from_metrics(m.text)
        snap["rate_per_min"] = self._rate_from(snap["requests_ok"])
        return {**snap, "available": True, "url": self.url}

    def _rate_from(self, requests: float) -> float | None:
        now = time.time()
        self._rate = [(t, n) for t, n in self._rate if now - t < 60] + [(now, requests)]
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        return round((n1 - n0) * 60 / (t1 - t0), 1) if t1 - t0 > 1 else None
