"""A fan-out subject's progress in the registry, the hook the control plane gives the workers:
rank 0 writes its step, losses and how many steps were executed (resumes included), at most
every few seconds. The fan-out passes :class:`StateTracker` to its worker groups
(``GroupConfig.tracker``); the trainers call it without knowing where progress goes."""

from __future__ import annotations

import time
from typing import Any


class StateTracker:
    """Rank 0 writes step and loss to the registry, at most every ``every_s`` seconds."""

    def __init__(self, registry, subject_id: str, dist, every_s: float, steps_executed: int):
        self.registry, self.subject_id, self.dist, self.every_s = registry, subject_id, dist, every_s
        self.steps_executed = steps_executed
        self.last: dict[str, float] = {}
        self.step = 0
        self.recent: list[float] = []
        self._t = 0.0

    @property
    def last_loss(self) -> float | None:
        return self.last.get("loss")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step, self.last = step, metrics
        self.steps_executed += 1
        self.recent = [*self.recent, round(metrics["loss"], 5)][-100:]
        self.flush()

    def flush(self, *, force: bool = False, **extra: Any) -> None:
        if not self.dist.is_main or (not force and time.monotonic() - self._t < self.every_s):
            return
        self._t = time.monotonic()
        st = self.registry.get_state(self.subject_id)
        worker = dict(st.worker) if st else {}
        worker["steps_executed"] = self.steps_executed
        self.registry.update_state(
            self.subject_id, step=self.step, loss=self.last.get("loss"), loss_instance=self.last.get("loss_instance"),
            loss_prior=self.last.get("loss_prior"), recent_losses=self.recent, worker=worker, **extra,
        )
