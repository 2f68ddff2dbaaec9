"""Ray's side of a run: the job's status from Ray's state API, stopping a job, and where
Ray's own dashboard is (if anywhere).

Every call is guarded: without a reachable Ray dashboard the pages still work, they only
lose the job column and the link to it. Answers are cached for a few seconds, failures for
longer, so that a page polling every two seconds never waits on a dead address.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("dreamfleet.dashboard")

OK_TTL_S, FAIL_TTL_S = 5.0, 30.0
PROBE_TIMEOUT_S = 1.5


def dashboard_url(address: str | None, explicit: str | None = None) -> str:
    """Ray's dashboard for a cluster address: http(s) kept, ray://host:port and host:port mapped to :8265."""
    if explicit:
        return explicit.rstrip("/")
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return "http://127.0.0.1:8265"
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or "127.0.0.1"
    return f"http://{host}:8265"


class RayJobs:
    """Job statuses by submission id (``dreamfleet-...``, also the run id of submitted runs)."""

    def __init__(self, address: str | None, ray_dashboard: str | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS")
        self.url = dashboard_url(self.address, ray_dashboard)
        self.explicit = ray_dashboard.rstrip("/") if ray_dashboard else None
        self._cache: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._link: tuple[float, str | None] | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def dashboard(self) -> str | None:
        """Ray's dashboard to link to: the one given (--ray-dashboard), else the one the cluster this
        process is connected to records, else the one the address names, if it answers; None when
        none does (the embedded local Ray of `dreamfleet serve` runs without one)."""
        if self.explicit:
            return self.explicit
        with self._lock:
            if self._link is None or time.monotonic() >= self._link[0]:
                url = _answering(self._dashboard_candidate())
                self._link = (time.monotonic() + (OK_TTL_S if url else FAIL_TTL_S), url)
            return self._link[1]

    def _dashboard_candidate(self) -> str | None:
        if not (self.address or "").startswith(("http://", "https://")) and _ray_connected():
            recorded = _recorded_dashboard()
            if recorded is not None:
                return recorded or None  # "": the cluster runs no dashboard
        return self.url

    def _api_address(self) -> str | None:
        """Where the state/job API is: the given address if it is a dashboard URL, else the derived one."""
        if self.address and self.address.startswith(("http://", "https://")):
            return self.address
        return self.url if (self.address or _ray_connected()) else None

    def jobs(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            if self._cache is not None and time.monotonic() < self._cache[0]:
                return self._cache[1]
            api = self._api_address()
            jobs: dict[str, dict[str, Any]] = {}
            ttl = FAIL_TTL_S
            if api is not None:
                try:
                    from ray.util.state import list_jobs

                    for j in list_jobs(address=api, timeout=2, raise_on_missing_output=False):
                        if j.submission_id:
                            jobs[j.submission_id] = {"status": str(j.status).split(".")[-1],
                                                     "message": j.message, "url": f"{self.url}/#/jobs/{j.submission_id}"}
                    ttl, self._error = OK_TTL_S, None
                except Exception as e:  # no dashboard, refused, auth: the page goes on without job states
                    self._error = f"Ray state API at {api}: {type(e).__name__}"
                    log.debug("ray state API unavailable: %s", e)
            self._cache = (time.monotonic() + ttl, jobs)
            return jobs

    @property
    def error(self) -> str | None:
        return self._error

    def stop(self, job_id: str, address: str | None = None) -> bool:
        """Ask Ray to stop a job; True if it was running."""
        from ray.job_submission import JobSubmissionClient

        target = address if address and address.startswith(("http://", "https://")) else (self._api_address() or self.url)
        client = JobSubmissionClient(target)
        stopped = client.stop_job(job_id)
        self._cache = None
        return bool(stopped)


def _recorded_dashboard() -> str | None:
    """The dashboard URL the connected cluster records ("" when it started none), or None if unreadable."""
    try:
        from ray._private.services import get_webui_url_from_internal_kv

        url = get_webui_url_from_internal_kv() or ""
    except Exception as e:  # a private API of Ray: without it, the address's dashboard is probed instead
        log.debug("ray dashboard url unavailable: %s", e)
        return None
    return url if not url or url.startswith(("http://", "https://")) else f"http://{url}"


def _answering(url: str | None) -> str | None:
    """``url`` if an HTTP server answers there (a login page counts), else None."""
    if url is None:
        return None
    import httpx

    try:
        r = httpx.get(f"{url}/", timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError:
        return None
    return url if r.status_code < 400 or r.status_code in (401, 403) else None


def _ray_connected() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:
        return False
