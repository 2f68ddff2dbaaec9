"""`dreamfleet train | experts | submit | status`: the fan-out and its registry."""

from __future__ import annotations

import argparse
import json
import os
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

    e = sub.add_parser("experts", help="list, show, delete or export experts in a registry")
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
    ex = esub.add_parser("export", help="write an expert as one file: a LoRA in the kohya/A1111 layout, or a full "
                                        "SD 1.x expert as an original-layout checkpoint (ComfyUI, WebUI)")
    ex.add_argument("subject")
    ex.add_argument("--registry", required=True)
    ex.add_argument("--version", help="version (default: latest)")
    ex.add_argument("--format", default="kohya", choices=["kohya", "ldm"],
                    help="kohya: a LoRA expert's LoRA; ldm: a full SD 1.x expert as one checkpoint (with its base's VAE)")
    ex.add_argument("--out", type=Path, help="file to write (default: <subject>-<version>.safetensors here)")
    ex.set_defaults(handler=run_experts_export)
    register_jobs(sub)


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


def run_experts_export(args: argparse.Namespace) -> int:
    from dreamfleet.core.export import export_expert
    from dreamfleet.registry import Registry

    reg = Registry(args.registry, create=False)
    version = reg.resolve_version(args.subject, args.version)
    out = args.out or Path(f"{args.subject}-{version}.safetensors")
    export_expert(reg.fetch(args.subject, version), out, args.format)
    print(f"{args.subject} {version} written to {out} ({args.format} layout)")
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


# --------------------------------------------------------------------------- cluster jobs


def register_jobs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit a fan-out run to a Ray cluster as a Ray Job; prints the job id",
        description=(
            "Submits `dreamfleet train MANIFEST --out REGISTRY ...` to the cluster's Job Submission API "
            "(the head's dashboard address, e.g. http://HEAD:8265). The manifest and the registry must be "
            "on storage every node reaches (s3://, gs://, NFS). Options after the known ones are passed "
            "through to `dreamfleet train`."
        ),
    )
    p.add_argument("manifest")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--out", required=True, help="registry URI (shared storage)")
    p.add_argument("--python", default="python", help="python executable on the cluster")
    p.add_argument("--working-dir", help="ship this folder to the cluster as the job's working_dir")
    p.add_argument("--pip", help="comma-separated extra pip requirements for the job's runtime env")
    p.add_argument("--job-id", help="submission id (default: dreamfleet-<time>-<random>)")
    p.add_argument("--agent-wait", type=float, default=120.0, metavar="SECONDS",
                   help="how long to keep retrying while a just-started head has no job agent yet (default 120)")
    p.set_defaults(handler=run_submit)

    s = sub.add_parser("status", help="a submitted run: job status and per-subject progress")
    s.add_argument("job_id")
    s.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    s.add_argument("--registry", help="registry URI (default: the one recorded at submission)")
    s.add_argument("--logs", action="store_true", help="also print the job's driver log tail")
    s.set_defaults(handler=run_status)


def _client(address: str):
    # Ray clusters use token authentication by default; send the local token when there is one.
    # (Before importing ray: it reads the mode once.)
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    from dreamfleet.core.errors import DreamfleetError

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, bad URL, auth
        raise DreamfleetError(f"cannot reach the Ray Job API at {address} ({e}); is the head's dashboard up?") from None


def run_submit(args: argparse.Namespace, passthrough: list[str] | None = None) -> int:
    import shlex
    import time
    import uuid

    passthrough = passthrough if passthrough is not None else getattr(args, "passthrough", [])
    job_id = args.job_id or time.strftime("dreamfleet-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    cmd = [args.python, "-m", "dreamfleet.cli.main", "train", args.manifest, "--out", args.out,
           "--run-id", job_id, *passthrough]
    runtime_env: dict = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false",
                                      "DREAMFLEET_JOB_ID": job_id}}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    if args.pip:
        runtime_env["pip"] = [p.strip() for p in args.pip.split(",") if p.strip()]
    client = _client(args.address)
    submitted = submit_when_agent_is_up(
        client, args.agent_wait, entrypoint=shlex.join(cmd), submission_id=job_id, runtime_env=runtime_env,
        metadata={"dreamfleet_registry": args.out, "dreamfleet_manifest": args.manifest},
    )
    print(submitted)
    return 0


def submit_when_agent_is_up(client, wait_s: float, **job) -> str:
    """``client.submit_job(**job)``, retried while the head answers that no agent can take the
    job yet: a head that has just started (or a KubeRay head pod that just turned ready) serves
    the Job API a few seconds before its dashboard agent registers. Nothing was created by a
    refused attempt, so submitting again under the same id is safe."""
    import time

    from dreamfleet.core.errors import DreamfleetError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise DreamfleetError(f"the Ray head has no job agent ready after {wait_s:g} s ({e}); "
                                      "check the head's dashboard agent, or raise --agent-wait") from None
            print("the head's job agent is not up yet; retrying", file=sys.stderr)
            time.sleep(2)


def run_status(args: argparse.Namespace) -> int:
    from dreamfleet.registry import Registry

    client = _client(args.address)
    info = client.get_job_info(args.job_id)
    registry_uri = args.registry or (info.metadata or {}).get("dreamfleet_registry")
    print(f"job {args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    if registry_uri:
        reg = Registry(registry_uri, create=False)
        run = reg.run(args.job_id)
        if run is None:
            print(f"  run not started yet in {registry_uri}")
        else:
            subjects = run.get("subjects", [])
            rows = []
            for sid in subjects:
                st = reg.get_state(sid)
                if sid in run.get("skipped", []):
                    rows.append([sid, "skipped", "-", "-", ""])
                elif st is None:
                    rows.append([sid, "?", "-", "-", ""])
                else:
                    loss = f"{st.loss:.4f}" if st.loss is not None else "-"
                    rows.append([sid, st.state, f"{st.step}/{st.total_steps or '?'}", loss, (st.error or "")[:60]])
            counts: dict[str, int] = {}
            for r in rows:
                counts[r[1]] = counts.get(r[1], 0) + 1
            print("  " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
            print(_table(rows, ["SUBJECT", "STATE", "STEP", "LOSS", "ERROR"]))
    if args.logs:
        print(client.get_job_logs(args.job_id)[-5000:])
    return 0 if str(info.status) not in ("FAILED", "JobStatus.FAILED") else 1
