"""The fan-out's progress display: a live table on a terminal, concise lines otherwise."""

from __future__ import annotations

import io

from dreamfleet.control.console import RunConsole
from dreamfleet.registry.store import SubjectState


class Registry:
    def __init__(self):
        self.states = {"dog1": SubjectState("dog1", "training", step=40, loss=0.1234)}

    def get_state(self, sid):
        return self.states.get(sid)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress(done=0, failed=0, training=1, pending=2, leased=("dog1",)):
    return {"total": 4, "done": done, "failed": failed, "training": training, "pending": pending,
            "leased": list(leased), "elapsed_s": 1.0}


def test_lines_when_the_output_is_not_a_terminal():
    out, reg = io.StringIO(), Registry()
    console = RunConsole(reg, {"dog1": 100}, enabled=True, stream=out, every_s=0.0)
    console.update(progress())
    console.update(progress())  # nothing changed: no new line
    reg.states["dog1"] = SubjectState("dog1", "training", step=90, loss=0.05)
    console.update(progress(done=1, training=1, pending=1))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(line.startswith("progress: ") for line in lines)
    assert "0/4 subjects finished (0 done, 0 failed), 1 training, 2 queued" in lines[0]
    assert "dog1 40/100 loss 0.1234" in lines[0] and "dog1 90/100 loss 0.0500" in lines[1]
    assert "1/4 subjects finished" in lines[1]


def test_lines_wait_for_the_interval_except_the_last():
    out = io.StringIO()
    console = RunConsole(Registry(), {"dog1": 100}, enabled=True, stream=out, every_s=3600)
    console.update(progress())
    console.update(progress(done=1, training=0, pending=2, leased=()))  # within the interval: skipped
    console.update(progress(done=4, training=0, pending=0, leased=()), final=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "4/4 subjects finished (4 done, 0 failed)" in lines[1]


def test_a_terminal_gets_a_table_redrawn_in_place():
    out, reg = Tty(), Registry()
    console = RunConsole(reg, {"dog1": 100}, enabled=True, stream=out)
    console.update(progress())
    first = out.getvalue()
    assert "subject" in first and "ETA" in first and "dog1" in first and "40" in first and "\x1b[" not in first
    reg.states["dog1"] = SubjectState("dog1", "training", step=60, loss=0.1)
    console.update(progress())
    redraw = out.getvalue()[len(first):]
    assert redraw.startswith("\x1b[3F\x1b[J") and "60" in redraw  # back up 3 lines (counts, header, row)


def test_disabled_prints_nothing():
    out = io.StringIO()
    RunConsole(Registry(), {}, enabled=False, stream=out).update(progress(), final=True)
    assert out.getvalue() == ""


def test_a_run_eta_from_the_training_subjects_step_rate(monkeypatch):
    """From the training subjects' step rate: what they have left, then the queued ones in
    waves of as many subjects, each as long as one takes."""
    clock = [100.0]
    monkeypatch.setattr("dreamfleet.control.console.time.monotonic", lambda: clock[0])
    out, reg = io.StringIO(), Registry()
    console = RunConsole(reg, {"dog1": 100}, enabled=True, stream=out, every_s=0.0)
    console.update(progress())
    clock[0] += 10.0
    reg.states["dog1"] = SubjectState("dog1", "training", step=60, loss=0.1)  # 2 steps/s: 20 s left, 50 s a subject
    console.update(progress())
    last = out.getvalue().splitlines()[-1]
    assert "ETA 2m00s" in last and "dog1 60/100 loss 0.1000 ETA 0m20s" in last  # 20 s + 2 waves x 50 s
