"""What the pages show, read from the registry on every request (no second copy of the state).

Each function returns plain JSON-able data. A run started on another machine shows up as
soon as its ``runs/<id>.json`` and subject states appear in the registry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from dreamfleet.core.errors import DreamfleetError
from dreamfleet.core.expert import FINAL_LOSS_STEPS
from dreamfleet.registry import Registry, SubjectState
from dreamfleet.registry.store import EVAL_FILE

log = logging.getLogger("dreamfleet.dashboard")

STATE_ORDER = ("training", "queued", "failed", "done", "skipped")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_CURVE_POINTS = 400
EVAL_FILES = (EVAL_FILE, "evaluation.json", "metrics.json")


class NotFound(DreamfleetError):
    """Something the page asked for is not in the registry (answered 404 with the message)."""


def _parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def subject_row(st: SubjectState) -> dict[str, Any]:
    """One line of a subjects table."""
    return {
        "subject": st.subject_id, "state": st.state, "run_id": st.run_id, "class_noun": st.class_noun,
        "tenant": st.tenant, "step": st.step, "total_steps": st.total_steps, "loss": st.loss,
        "recent_losses": st.recent_losses[-100:], "attempts": st.attempts, "error": st.error,
        "version": st.version, "node": (st.worker or {}).get("node"), "updated_at": st.updated_at,
        "started_at": st.started_at, "finished_at": st.finished_at,
    }


def _fraction(st: SubjectState | None) -> float:
    """How far one subject of a run is: 1 when finished (done or failed), its step share while training."""
    if st is None:
        return 0.0
    if st.state in ("done", "failed"):
        return 1.0
    if st.state == "training" and st.total_steps:
        return min(st.step / st.total_steps, 0.99)
    return 0.0


def run_progress(run: dict[str, Any], states: dict[str, SubjectState]) -> dict[str, Any]:
    """Counts by state, the fraction done, elapsed time and an ETA for one run record."""
    run_id = run.get("run_id")
    skipped = set(run.get("skipped") or [])
    counts = dict.fromkeys(STATE_ORDER, 0)
    fractions = []
    for sid in run.get("subjects") or []:
        st = states.get(sid)
        if sid in skipped:
            counts["skipped"] += 1
            continue
        if st is None or st.run_id != run_id:
            # a later run took the subject over: this run's outcome is in its record
            state = "done" if sid in (run.get("done") or []) else ("failed" if sid in (run.get("failed") or {}) else "queued")
            counts[state] += 1
            fractions.append(1.0 if state != "queued" or run.get("state") != "running" else 0.0)
            continue
        counts[st.state] += 1
        fractions.append(_fraction(st))
    fraction = sum(fractions) / len(fractions) if fractions else 1.0
    started, finished = _parse_time(run.get("started_at")), _parse_time(run.get("finished_at"))
    elapsed = ((finished or _now()) - started).total_seconds() if started else None
    eta = None
    if run.get("state") == "running" and elapsed and 0 < fraction < 1:
        eta = elapsed * (1 - fraction) / fraction
    return {"counts": counts, "fraction": round(fraction, 4), "elapsed_s": elapsed, "eta_s": eta,
            "total": len(run.get("subjects") or [])}


def run_summary(run: dict[str, Any], states: dict[str, SubjectState]) -> dict[str, Any]:
    return {
        "run_id": run.get("run_id"), "manifest": run.get("manifest"), "base_model": run.get("base_model"),
        "base_family": run.get("base_family"),
        "state": run.get("state", "running"), "started_at": run.get("started_at"),
        "finished_at": run.get("finished_at"), "job_id": run.get("job_id"), "ray_address": run.get("ray_address"),
        "cancelled_at": run.get("cancelled_at"), **run_progress(run, states),
    }


def runs_view(reg: Registry) -> dict[str, Any]:
    states = reg.states()
    runs = [run_summary(r, states) for r in reg.runs()]
    runs.reverse()  # newest first
    counts = dict.fromkeys(STATE_ORDER, 0)
    for st in states.values():
        counts[st.state] += 1
    return {"runs": runs, "subjects": len(states), "counts": counts}


def run_view(reg: Registry, run_id: str) -> dict[str, Any]:
    run = reg.run(run_id)
    if run is None:
        raise NotFound(f"no run {run_id!r} in the registry {reg.uri}")
    states = reg.states()
    rows = []
    skipped = set(run.get("skipped") or [])
    for sid in run.get("subjects") or []:
        st = states.get(sid)
        if sid in skipped:
            row = subject_row(st) if st else subject_row(SubjectState(sid, state="done"))
            row["state"] = "skipped"
        elif st is None:
            row = subject_row(SubjectState(sid))
        else:
            row = subject_row(st)
            if st.run_id != run_id:
                row["note"] = f"now part of run {st.run_id}"
        rows.append(row)
    config = {"train_config": run.get("train_config"), "fanout": run.get("fanout"),
              "code_version": run.get("code_version")}
    return {"run": run_summary(run, states), "subjects": rows, "config": config}


def subjects_view(reg: Registry) -> dict[str, Any]:
    """Every subject of the registry, whichever run (or none) made it."""
    return {"subjects": [subject_row(st) for st in reg.states().values()]}


def _downsample(points: list[dict[str, Any]], limit: int = MAX_CURVE_POINTS) -> list[dict[str, Any]]:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit)]
    if picked[-1] is not points[-1]:
        picked[-1] = points[-1]
    return picked


def _curve(folder: Path | None, st: SubjectState | None) -> tuple[list[dict[str, Any]], str]:
    """The loss curve: the expert's full history, else the recent losses of a subject still training."""
    if folder is not None and (folder / "loss_history.json").is_file():
        try:
            history = json.loads((folder / "loss_history.json").read_text())
        except (ValueError, OSError) as e:
            log.warning("unreadable loss history in %s (%s)", folder, e)
            history = []
        keys = ("step", "loss", "loss_instance", "loss_prior", "lr", "grad_norm")
        points = [{k: h.get(k) for k in keys} for h in history if isinstance(h, dict)]
        return _downsample(points), "loss_history.json of the expert"
    if st is not None and st.recent_losses:
        first = st.step - len(st.recent_losses) + 1
        points = [{"step": first + i, "loss": v} for i, v in enumerate(st.recent_losses)]
        return points, "the last losses reported while training (the full curve comes with the expert)"
    return [], "no losses reported yet"


def _images(folder: Path, sub: str) -> list[str]:
    d = folder / sub
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _evaluation(folder: Path, info: Any) -> dict[str, Any] | None:
    for name in EVAL_FILES:
        path = folder / name
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (ValueError, OSError):
                return {"error": f"{name} is not readable JSON"}
    stats = getattr(info, "train_stats", None) or {}
    metrics = {k: v for k, v in stats.items() if k.startswith(("eval_", "dino", "clip", "toy_"))}
    return metrics or None


def _final_loss_steps(info: Any) -> int:
    """How many steps the expert's final loss is the mean of (the state's loss is the last step's alone)."""
    steps = (info.train_stats or {}).get("steps") or (info.config or {}).get("steps") or FINAL_LOSS_STEPS
    return min(FINAL_LOSS_STEPS, int(steps))


def subject_view(reg: Registry, sid: str, version: str | None = None) -> dict[str, Any]:
    if sid not in reg.subjects():
        raise NotFound(f"no subject {sid!r} in the registry {reg.uri}")
    st = reg.get_state(sid)
    versions = reg.versions(sid)
    latest = reg.latest(sid)
    chosen = version or latest or (versions[-1] if versions else None)
    if chosen is not None and chosen not in versions:
        raise NotFound(f"subject {sid!r} has no version {chosen!r}; versions: {', '.join(versions) or 'none'}")
    out: dict[str, Any] = {"subject": sid, "state": subject_row(st) if st else None, "versions": versions,
                           "latest": latest, "version": chosen, "expert": None, "images": {}, "evaluation": None}
    folder = None
    if chosen is None:
        out["message"] = (f"subject {sid!r} has no published expert yet"
                          + (f" (state: {st.state}, step {st.step}/{st.total_steps or '?'})" if st else ""))
    else:
        try:
            folder = reg.fetch(sid, chosen)
            info = reg.expert_info(sid, chosen)
        except DreamfleetError as e:
            out["message"] = str(e)
        else:
            out["expert"] = {k: v for k, v in dataclasses.asdict(info).items() if k != "config"}
            out["expert"]["final_loss_steps"] = _final_loss_steps(info)
            out["config"] = info.config
            out["evaluation"] = _evaluation(folder, info)
            validation = _images(folder, "validation")
            out["images"] = {"instance": _images(folder, "instance"), "validation": validation[-2:],
                             "validation_all": len(validation)}
    points, source = _curve(folder, st)
    if folder is not None and st is not None and st.state == "training" and st.run_id:
        points, source = _curve(None, st)  # retraining: the live losses are newer than the published curve
    out["curve"] = {"points": points, "source": source}
    return out


def expert_file(reg: Registry, sid: str, version: str, kind: str, name: str) -> Path:
    """An image of an expert folder (training photo or validation grid), never anything else."""
    if kind not in ("instance", "validation") or "/" in name or "\\" in name or name.startswith("."):
        raise NotFound(f"no such expert file {kind}/{name}")
    if not name.lower().endswith(IMAGE_SUFFIXES):
        raise NotFound(f"{name}: only images are served")
    try:
        folder = reg.fetch(sid, version)
    except DreamfleetError as e:
        raise NotFound(str(e)) from None
    path = folder / kind / name
    if not path.is_file():
        raise NotFound(f"subject {sid!r} version {version}: no file {kind}/{name}")
    return path


# How to give the Apprentice page its folders, by the command the dashboard runs in.
APPRENTICE_HINTS = {
    "dashboard": {"apprentices": "start the dashboard with --apprentices DIR[,DIR...]",
                  "demo_sets": "start the dashboard with --demo-sets DIR[,DIR...]"},
    "serve": {"apprentices": "this dashboard runs inside `dreamfleet serve`, which shows the apprentice it serves: "
                             "start it with --apprentice DIR",
              "demo_sets": "`dreamfleet serve` shows none: run `dreamfleet dashboard --registry REGISTRY "
                           "--demo-sets DIR[,DIR...]`"},
}


def apprentice_view(apprentices: list[str], demo_sets: list[str], *, in_serve: bool = False) -> dict[str, Any]:
    """The apprentices and demonstration sets the dashboard was started with.

    An apprentice: its ``apprentice.json`` (identifier, base model, dataset, recipe, timings) and
    ``loss_history.json`` curve; a demonstration set: its ``gather.json`` counts (generated,
    kept, kept at other thresholds). A folder that cannot be read is listed with its error.
    ``hints`` name the flags of the command the dashboard runs in (`dreamfleet dashboard` or `serve`).
    """
    hints = APPRENTICE_HINTS["serve" if in_serve else "dashboard"]
    if not apprentices and not demo_sets:
        return {"available": False, "hints": hints, "message": (
            f"no apprentice or demonstration set given. Apprentices: {hints['apprentices']}. "
            f"Demonstration sets: {hints['demo_sets']}.")}
    out: dict[str, Any] = {"available": True, "hints": hints, "apprentices": [], "demo_sets": []}
    for folder in apprentices:
        path = Path(folder)
        try:
            info = json.loads((path / "apprentice.json").read_text())
            history = path / "loss_history.json"
            points = json.loads(history.read_text()) if history.is_file() else []
            cfg = info.get("config") or {}
            out["apprentices"].append({
                "path": str(path), "identifier": info.get("identifier"),
                "base_model": (info.get("base_model") or {}).get("spec"), "dataset": info.get("dataset") or {},
                "steps": (info.get("train_stats") or {}).get("steps"), "final_loss": info.get("final_loss"),
                "wall_time_s": info.get("wall_time_s"), "created_at": info.get("created_at"),
                "recipe": {k: cfg.get(k) for k in ("learning_rate", "batch_size", "photo_targets", "train_unet")
                           if k in cfg},
                "curve": {"points": _downsample([p for p in points if isinstance(p, dict)]), "source": str(history)},
            })
        except (ValueError, OSError) as e:
            out["apprentices"].append({"path": str(path), "error": f"not a readable apprentice folder ({e}); "
                                                                   "pass the --out of `dreamfleet apprentice train`"})
    for folder in demo_sets:
        path = Path(folder)
        try:
            g = json.loads((path / "gather.json").read_text())
            out["demo_sets"].append({
                "path": str(path), "experts": g.get("experts"), "generated": g.get("generated", g.get("targets_in")),
                "kept": g.get("kept"), "threshold": g.get("threshold", (g.get("config") or {}).get("threshold")),
                "kept_at_threshold": g.get("kept_at_threshold") or {}, "failed": g.get("failed") or {},
                "wall_time_s": g.get("wall_time_s"), "filtered_from": g.get("filtered_from"),
            })
        except (ValueError, OSError) as e:
            out["demo_sets"].append({"path": str(path), "error": f"not a readable demonstration set ({e}); "
                                                                 "pass the --out of `dreamfleet apprentice gather`"})
    return out
