"""Admission control at the ingress: per-tenant rate limits and the per-request work budget.

The third bound, a replica's queue, is Ray Serve's own (``max_ongoing_requests`` and
``max_queued_requests`` on the model deployment, set in :func:`dreamfleet.serving.app.build_app`).
"""

from __future__ import annotations

import math
import threading
import time


class TenantRateLimit:
    """A token bucket per tenant: ``per_min`` requests a minute, ``burst`` at once.

    One tenant that floods the server spends only its own bucket, so the others are still
    admitted; ``admit`` says how long to wait when the bucket is empty (the 429's Retry-After)."""

    def __init__(self, per_min: float, burst: int, clock=time.monotonic):
        self.rate = per_min / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)
        self._lock = threading.Lock()

    def admit(self, tenant: str, per_min: float | None = None) -> float | None:
        """None when admitted, else the seconds until the tenant's next request would be;
        ``per_min``: this bucket's own rate instead of the server's (a key's ``rate_per_min``)."""
        rate = self.rate if per_min is None else per_min / 60.0
        if rate <= 0:
            return None
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[tenant] = (tokens - 1.0, now)
                return None
            self._buckets[tenant] = (tokens, now)
            return (1.0 - tokens) / rate


def retry_after(seconds: float) -> str:
    """An HTTP Retry-After value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def pixel_steps(width: int, height: int, steps: int, images: int) -> int:
    """The work of one request, as the budget counts it."""
    return width * height * steps * images
