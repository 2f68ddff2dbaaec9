"""What the driver of a fan-out shows while it runs.

On a terminal, a table redrawn every second: each subject in training with its step, steps,
loss and ETA, and a line of counts. Otherwise (CI logs, Ray Job logs, `make demo | tee`), one
concise line whenever something changed, at most every ``every_s`` seconds, and a last one
at the end. The steps and losses are the ones rank 0 of each group writes to the registry
(``--state-every-s``); the counts come from the run's queue.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunConsole:
    def __init__(self, registry, steps: dict[str, int], *, enabled: bool, stream: TextIO | None = None,
                 every_s: float = 10.0):
        self.registry, self.steps, self.enabled = registry, steps, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.monotonic()
        self.seen: dict[str, tuple[float, int]] = {}  # subject -> (when first seen training, its step then)
        self._drawn, self._last_line = 0, ""
        self._last_t = float("-inf")  # the first line is always due (monotonic() can be < every_s after boot)

    def update(self, progress: dict[str, Any], *, final: bool = False) -> None:
        """Show the queue's ``progress()``: its counts, and its ``leased`` subjects' rows."""
        if not self.enabled or not (self.tty or final or time.monotonic() - self._last_t >= self.every_s):
            return
        rows = [self._row(sid) for sid in progress.get("leased", [])]
        if self.tty:
            self._draw([self._counts(progress, rows), *(self._table(rows) if rows else [])])
            return
        line = self._counts(progress, rows) + (
            "; " + ", ".join(f"{r[0]} {r[2]}/{r[3]} loss {r[4]}" + (f" ETA {r[5]}" if r[5] != "?" else "")
                             for r in rows) if rows else "")
        if line != self._last_line or final:
            self.stream.write(f"progress: {line}\n")
            self.stream.flush()
            self._last_line, self._last_t = line, time.monotonic()

    def _row(self, sid: str) -> tuple:
        """(subject, state, step, steps, loss, ETA shown; seconds left, seconds in all, when known)"""
        st = self.registry.get_state(sid)
        step, total = (st.step if st else 0), self.steps.get(sid, 0)
        now = time.monotonic()
        t_seen, s_seen = self.seen.setdefault(sid, (now, step))
        rate = (step - s_seen) / (now - t_seen) if step > s_seen and now > t_seen else None
        eta = (total - step) / rate if rate else None
        loss = f"{st.loss:.4f}" if st and st.loss is not None else "-"
        return (sid, (st.state if st else "leased"), step, total, loss, _duration(eta), eta,
                total / rate if rate else None)

    def _counts(self, p: dict[str, Any], rows: list[tuple] = ()) -> str:
        finished = p["done"] + p["failed"]
        elapsed = time.monotonic() - self.t0
        eta = self._rate_eta(p, rows)
        if eta is None and finished:
            eta = elapsed / finished * (p["total"] - finished)
        return (f"{finished}/{p['total']} subjects finished ({p['done']} done, {p['failed']} failed), "
                f"{p['training']} training, {p['pending']} queued; {_duration(elapsed)} elapsed, ETA {_duration(eta)}")

    def _rate_eta(self, p: dict[str, Any], rows: list[tuple]) -> float | None:
        """From the training subjects' step rates: their remaining time, then the queued ones
        in waves of as many, each as long as a training subject takes in all (None before any
        rate is known; then finished subjects' mean time stands in)."""
        timed = [(r[6], r[7]) for r in rows if r[6] is not None]  # (seconds left, seconds in all)
        if not timed:
            return None
        waves = -(-p["pending"] // max(1, len(rows)))
        return max(left for left, _ in timed) + waves * sum(whole for _, whole in timed) / len(timed)

    @staticmethod
    def _table(rows: list[tuple]) -> list[str]:
        head = ("subject", "state", "step", "steps", "loss", "ETA")
        cells = [head, *[tuple(map(str, r[:6])) for r in rows]]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        return ["  " + "  ".join(c[i].ljust(widths[i]) for i in range(len(head))) for c in cells]

    def _draw(self, lines: list[str]) -> None:
        if self._drawn:  # back to the first line drawn last time, and clear below it
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)
