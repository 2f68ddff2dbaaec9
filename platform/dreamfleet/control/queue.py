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
        self.leases: dict[int, list[str]] = {}  # group -> the subjects it holds (several when it packs)
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.errors: dict[str, list[str]] = collections.defaultdict(list)
        self.started = time.time()

    def lease(self, group: int) -> tuple[str, int] | None:
        leased = self.lease_many(group, 1)
        return leased[0] if leased else None

    def lease_many(self, group: int, n: int) -> list[tuple[str, int]]:
        """Up to ``n`` subjects for one group (a packed run trains them together)."""
        for sid in self.leases.pop(group, []):  # this group restarted while training these subjects
            self._retry(sid, "worker group restarted: a worker died or raised")
        out = []
        while self.pending and len(out) < n:
            sid = self.pending.popleft()
            self.attempts[sid] += 1
            self.leases.setdefault(group, []).append(sid)
            out.append((sid, self.attempts[sid]))
        return out

    def finish(self, group: int, subject_id: str, ok: bool, error: str | None, retriable: bool) -> str:
        held = self.leases.get(group, [])
        if subject_id in held:
            held.remove(subject_id)
            if not held:
                del self.leases[group]
        if ok:
            self.done.append(subject_id)
            return "done"
        if retriable:
            return self._retry(subject_id, error or "unknown error")
        return self._fail(subject_id, error or "unknown error")

    def group_exited(self, group: int, error: str) -> None:
        """A worker group gave up (its Ray Train failures were exhausted) holding leases."""
        for sid in self.leases.pop(group, []):
            self._retry(sid, error)

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
        """Counts, and the subjects leased now (at most the groups' packs): the driver polls
        this every second, and lists of 100,000 done or pending ids would be megabytes per call."""
        leased = [sid for sids in self.leases.values() for sid in sids]
        return {
            "total": self.total, "done": len(self.done), "failed": len(self.failed), "pending": len(self.pending),
            "training": len(leased), "leased": leased, "elapsed_s": time.time() - self.started,
        }

    def pending_subjects(self) -> list[str]:
        return list(self.pending)

    def outcome(self) -> tuple[list[str], dict[str, str]]:
        """What this run did: its done subjects and its failed ones with their errors. A run's
        summary comes from here, not from the registry's subject states, which another run
        training the same subject may be writing."""
        return list(self.done), dict(self.failed)

    def remaining(self) -> int:
        return len(self.pending) + sum(len(sids) for sids in self.leases.values())
