"""`dreamfleet train | experts | submit | status`: the fan-out and its registry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamfleet.core import config as C


def register(sub: argparse._SubParsersAction) -> None:
    from dreamfleet.control.orchestrator import FanoutConfig
    from dreamfleet.trainers.config import TrainConfig

    p = sub.add_parser(
        "train",
        help="fan a manifest of subjects out over a Ray cluster (one DreamBooth expert per subject)",
        description=(
            "Trains every subject of MANIFEST (or --subjects) with DreamBooth on a Ray cluster "
            "(--address, RAY_ADDRESS, or an embedded local Ray) and publishes each expert to the "
            "registry --out. Run it again after an interruption: finished subjects are skipped and "
            "unfinished ones resume from their last checkpoint."
        ),
    )
    p.add_argument("manifest", help="manifest folder or URI (see `dreamfleet manifest build`)")
    p.add_argument("--out", required=True, help="registry folder or URI (s3://..., gs://...)")
    p.add_argument("--base-model", default="tiny-random", help="'tiny-random', a local diffusers folder or a hub id")
    p.add_argument("--subjects", help="comma-separated subject ids (default: all)")
    p.add_argument("--config", type=Path, help="JSON/YAML recipe of TrainConfig fields; flags override it")
    p.add_argument("--run-id", help="name of this run in the registry (default: run-<time>-<random>)")
    C.add_arguments(p, FanoutConfig)
    C.add_arguments(p, TrainConfig, skip=("device",))
    p.set_defaults(handler=run_train)

    e = sub.add_parser("experts", help="list, show or delete experts in a registry")
    esub = e.add_subparsers(dest="experts_command", metavar="ACTION", required=True)
    el = esub.add_parser("list", help="one line per subject: state, latest version, loss")
    el.add_argument("--registry", required=True)
    el.add_argument("--json", action="store_true", help="machine-readable output")
    el.set_defaults(handler=run_experts_list)
    es = esub.add_parser("show", help="a subject's state, versions and the expert.json of one version")
    es.add_argument("subject")
    es.add_argument("--registry", required=True)
    es.add_argument("--version", help="version (default: latest)")
    es.set_defaults(handler=run_experts_show)
    ed = esub.add_parser("delete", help="delete one version (or, without --version, the whole subject)")
    ed.add_argument("subject")
    ed.add_argument("--registry", required=True)
    ed.add_argument("--version")
    ed.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    ed.set_defaults(handler=run_experts_delete)


def resolve_configs(args: argparse.Namespace):
    from dreamfleet.control.orchestrator import FanoutConfig
    from dreamfleet.trainers.config import TrainConfig

    data = C.load_recipe(args.config) if args.config else {}
    data.update(C.overrides_from_args(TrainConfig, args))
    train_cfg = C.from_dict(TrainConfig, data)
    fan = C.from_dict(FanoutConfig, C.overrides_from_args(FanoutConfig, args))
    return train_cfg, fan


def run_train(args: argparse.Namespace) -> int:
    from dreamfleet.control.orchestrator import run_fanout

    train_cfg, fan = resolve_configs(args)
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    summary = run_fanout(args.manifest, args.out, args.base_model, train_cfg, fan, subjects=subjects, run_id=args.run_id)
    print(f"run {summary.run_id}: {len(summary.done)} done, {len(summary.failed)} failed, "
          f"{len(summary.skipped)} skipped (already trained) in {summary.wall_time_s:.0f} s; registry {args.out}")
    for sid, error in summary.failed.items():
        print(f"  FAILED {sid}: {error}")
    return 1 if summary.failed else 0


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def run_experts_list(args: argparse.Namespace) -> int:
    from dreamfleet.registry import Registry

    reg = Registry(args.registry, create=False)
    rows = []
    for sid, st in reg.states().items():
        rows.append({
            "subject": sid, "state": st.state, "latest": reg.latest(sid), "versions": len(reg.versions(sid)),
            "step": f"{st.step}/{st.total_steps or '?'}", "loss": st.loss, "class": st.class_noun,
            "tenant": st.tenant, "error": st.error,
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no subjects in {args.registry}")
        return 0
    print(_table(
        [[r["subject"], r["state"], r["latest"] or "-", r["versions"], r["step"],
          f"{r['loss']:.4f}" if r["loss"] is not None else "-", r["class"] or "-", (r["error"] or "")[:60]]
         for r in rows],
        ["SUBJECT", "STATE", "LATEST", "VERSIONS", "STEP", "LOSS", "CLASS", "ERROR"],
    ))
    return 0


def run_experts_show(args: argparse.Namespace) -> int:
    from dreamfleet.core.errors import DataError
    from dreamfleet.registry import Registry

    reg = Registry(args.registry, create=False)
    st = reg.get_state(args.subject)
    if st is None and not reg.versions(args.subject):
        raise DataError(f"subject {args.subject!r} is not in the registry {args.registry}")
    out = {"state": st.__dict__ if st else None, "versions": reg.versions(args.subject), "latest": reg.latest(args.subject)}
    if out["versions"]:
        out["expert"] = reg.expert_info(args.subject, args.version).to_dict()
        out["path"] = str(reg.fetch(args.subject, args.version))
    print(json.dumps(out, indent=2, default=str))
    return 0


def run_experts_delete(args: argparse.Namespace) -> int:
    from dreamfleet.registry import Registry

    reg = Registry(args.registry, create=False)
    what = f"version {args.version} of {args.subject!r}" if args.version else f"subject {args.subject!r} and all its versions"
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"refusing to delete {what} without --yes (no terminal to ask)", file=sys.stderr)
            return 2
        if input(f"delete {what}? [y/N] ").strip().lower() not in ("y", "yes"):
            return 1
    removed = reg.delete(args.subject, args.version)
    print(f"deleted {args.subject}: {', '.join(removed) or 'no versions'}")
    return 0
