"""The subject queue of a fan-out run: a Ray actor that leases subjects to worker groups.

It owns retries: a subject whose group restarted (a worker died or raised inside a
collective) or that failed with a retriable error goes back to the front of the queue, to
resume from its checkpoint, until it has used ``max_retries`` retries; then it is marked
failed in the registry with the reason. Data and config errors are not retried.
"""

from __future__ import annotations

import collections
import time
from typing import Any


class SubjectQueue:
    def __init__(self, registry_uri: str, subjects: list[str], max_retries: int):
        from dreamfleet.registry import Registry

        self.registry = Registry(registry_uri)
        self.pending = collections.deque(subjects)
        self.total = len(subjects)
        self.max_retries = max_retries
        self.attempts: dict[str, int] = dict.fromkeys(subjects, 0)
        self.leases: dict[int, str] = {}
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.errors: dict[str, list[str]] = collections.defaultdict(list)
        self.started = time.time()

    def lease(self, group: int) -> tuple[str, int] | None:
        if group in self.leases:  # this group restarted while training a subject
            self._retry(self.leases.pop(group), "worker group restarted: a worker died or raised")
        if not self.pending:
            return None
        sid = self.pending.popleft()
        self.attempts[sid] += 1
        self.leases[group] = sid
        return sid, self.attempts[sid]

    def finish(self, group: int, subject_id: str, ok: bool, error: str | None, retriable: bool) -> str:
        if self.leases.get(group) == subject_id:
            del self.leases[group]
        if ok:
            self.done.append(subject_id)
            return "done"
        if retriable:
            return self._retry(subject_id, error or "unknown error")
        return self._fail(subject_id, error or "unknown error")

    def group_exited(self, group: int, error: str) -> None:
        """A worker group gave up (its Ray Train failures were exhausted) holding a lease."""
        if group in self.leases:
            self._retry(self.leases.pop(group), error)

    def _retry(self, sid: str, error: str) -> str:
        self.errors[sid].append(error)
        if self.attempts[sid] > self.max_retries:
            return self._fail(sid, f"{error} (after {self.attempts[sid]} attempts)")
        self.registry.update_state(sid, state="queued", error=f"retrying: {error}", attempts=self.attempts[sid])
        self.pending.appendleft(sid)
        return "retry"

    def _fail(self, sid: str, error: str) -> str:
        self.failed[sid] = error
        self.registry.update_state(sid, state="failed", error=error, attempts=self.attempts[sid])
        return "failed"

    def progress(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": list(self.done),
            "failed": dict(self.failed),
            "pending": list(self.pending),
            "training": dict(self.leases),
            "attempts": dict(self.attempts),
            "elapsed_s": time.time() - self.started,
        }

    def remaining(self) -> int:
        return len(self.pending) + len(self.leases)
