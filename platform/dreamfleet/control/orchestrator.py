"""The fan-out orchestrator: a manifest of subjects in, a registry of experts out.

``run_fanout`` connects to a Ray cluster (or starts an embedded local one), generates the
missing class images once per class with Ray Data, then runs up to ``max_concurrent``
long-lived worker groups (Ray Train ``TorchTrainer``s of ``workers_per_subject`` workers)
that take subjects from a shared queue until it is empty. Finished subjects are skipped
when the same command runs again; unfinished ones resume from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamfleet.control.cluster import NAMESPACE, WorkerConfig, absolute, connect_ray, worker_group
from dreamfleet.core.config import cfg, to_dict
from dreamfleet.core.errors import ConfigError, DataError
from dreamfleet.core.storage import concurrently
from dreamfleet.core.version import code_version
from dreamfleet.registry.store import now
from dreamfleet.trainers.config import TrainConfig

log = logging.getLogger("dreamfleet")


@dataclass(frozen=True)
class FanoutConfig(WorkerConfig):
    """How a manifest is spread over the cluster."""

    workers_per_subject: int = cfg(1, "Ray Train workers that train one subject together (DDP or DeepSpeed)")
    max_concurrent: int = cfg(1, "worker groups training subjects at the same time")
    max_retries: int = cfg(2, "retries of a failed subject before it is marked failed")
    retrain: bool = cfg(False, "train subjects that already have a published expert again (a new version)")
    class_cache: str | None = cfg(None, "class-image cache folder or s3:// URI (default: <registry>/class-images; on a "
                                        "remote registry every node mirrors it into its local cache)")
    class_image_actors: int = cfg(1, "Ray Data actors generating missing class images in parallel (each loads the base model)")
    pack: int = cfg(1, "LoRA subjects a worker trains together in one packed run (shared base-model passes; "
                       "1 worker per subject, no DeepSpeed)")
    state_every_s: float = cfg(1.0, "seconds between a training subject's progress writes to the registry (each "
                                    "is a registry request: raise it on large fleets, e.g. 10)")

    def __post_init__(self) -> None:
        self.check_workers()
        if self.workers_per_subject < 1 or self.max_concurrent < 1 or self.class_image_actors < 1:
            raise ConfigError("workers_per_subject, max_concurrent and class_image_actors must be at least 1")
        if self.pack < 1:
            raise ConfigError(f"pack must be at least 1, got {self.pack}")
        if self.pack > 1 and (self.workers_per_subject > 1 or self.zero_stage):
            raise ConfigError("--pack trains several subjects on one worker: use it with --workers-per-subject 1 "
                              "and no --zero-stage")
        if self.state_every_s <= 0:
            raise ConfigError(f"state_every_s must be positive, got {self.state_every_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must not be negative, got {self.max_retries}")


@dataclass
class RunSummary:
    run_id: str
    done: list[str]
    failed: dict[str, str]
    skipped: list[str]
    wall_time_s: float
    class_images_generated: int


def select_subjects(manifest, subjects: list[str] | None) -> list[str]:
    available = manifest.subject_ids()
    if not subjects:
        return available
    unknown = [s for s in subjects if s not in set(available)]
    if unknown:
        raise DataError(f"subject(s) {', '.join(map(repr, unknown))} are not in the manifest {manifest!r}")
    return list(dict.fromkeys(subjects))


def subject_configs(manifest, manifest_uri: str, subjects: list[str], train_cfg: TrainConfig,
                    base_model: str) -> dict[str, TrainConfig]:
    """Every subject's config, resolved once here on the driver before Ray starts or anything is
    written: the run's, with the manifest's per-subject overrides and the base model's defaults.
    These are what the workers train with and record. A bad override fails the submission,
    naming each subject and field, instead of a worker later."""
    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.config import subject_config

    native = load_base(base_model, fresh=False).resolution if subjects else 0
    configs, problems = {}, []
    for sid in subjects:
        try:
            configs[sid] = subject_config(train_cfg, manifest.record(sid), native_resolution=native)
        except ConfigError as e:
            problems.append(str(e) if sid in str(e) else f"subject {sid!r}: {e}")
    if problems:
        raise ConfigError(
            f"manifest {manifest_uri}: {len(problems)} subject(s) with invalid training overrides, nothing "
            "started:\n  " + "\n  ".join(problems) + "\nfix them in the manifest's subject table "
            "(columns steps, learning_rate, method, train_overrides) and rebuild it, or leave them out with --subjects"
        )
    return configs


def finished_subjects(registry, subjects: list[str]) -> list[str]:
    """The subjects with a published expert and no unfinished state: a rerun skips them."""
    def finished(sid: str) -> bool:
        st = registry.get_state(sid)
        return st is None or st.state == "done"

    return [sid for sid, ok in zip(subjects, concurrently(lambda s: finished(s) and registry.latest(s), subjects),
                                   strict=True) if ok]


def run_fanout(
    manifest_uri: str,
    registry_uri: str,
    base_model: str,
    train_cfg: TrainConfig,
    fan: FanoutConfig,
    *,
    subjects: list[str] | None = None,
    run_id: str | None = None,
    progress: bool = True,
) -> RunSummary:
    from dreamfleet.core.models import load_base
    from dreamfleet.data.manifest import Manifest
    from dreamfleet.registry import Registry

    t0 = time.perf_counter()
    manifest_uri = absolute(manifest_uri)
    registry_uri = absolute(registry_uri)
    manifest = Manifest.open(manifest_uri)
    chosen = select_subjects(manifest, subjects)
    registry = Registry(registry_uri)
    skipped = [] if fan.retrain else finished_subjects(registry, chosen)
    todo = [s for s in chosen if s not in set(skipped)]
    configs = subject_configs(manifest, manifest_uri, todo, train_cfg, base_model)
    if fan.pack > 1 and train_cfg.method != "lora":
        raise ConfigError(f"--pack {fan.pack} packs LoRA adapters; this run trains method={train_cfg.method!r} "
                          "(pass --method lora, or --pack 1)")
    bucketed = sorted(sid for sid, c in configs.items() if c.aspect_buckets)
    if bucketed and fan.pack > 1:
        raise ConfigError(f"aspect_buckets ({', '.join(bucketed[:5])}{' ...' if len(bucketed) > 5 else ''}) gives "
                          "each subject's batches their own sizes, which a packed run cannot stack: use --pack 1")
    selecting = sorted(sid for sid, c in configs.items() if c.select_every)
    if selecting and (fan.pack > 1 or fan.workers_per_subject > 1 or fan.zero_stage):
        raise ConfigError(f"select_every ({', '.join(selecting[:5])}{' ...' if len(selecting) > 5 else ''}) scores "
                          "each subject's weights on one process and stops it at its own step: run it with --pack 1, "
                          "--workers-per-subject 1 and no --zero-stage")
    run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    # one class-image cache for the run: the local registry's folder, or on a remote registry
    # its class-images/ prefix, which every node mirrors (nodes share no disk there)
    class_cache = fan.class_cache or (str(Path(registry.root) / "class-images") if registry.is_local
                                      else f"{registry.uri.rstrip('/')}/class-images")
    registry.write_run(run_id, {
        "manifest": manifest_uri, "base_model": base_model, "subjects": chosen, "skipped": skipped,
        "base_family": load_base(base_model, fresh=False).family if todo else None,
        "train_config": to_dict(train_cfg), "fanout": to_dict(fan), "code_version": code_version(),
        "started_at": now(), "state": "running", "ray_address": fan.address or os.environ.get("RAY_ADDRESS"),
        "job_id": os.environ.get("RAY_JOB_ID") or os.environ.get("DREAMFLEET_JOB_ID"),
    })
    _mark_queued(registry, manifest, todo, run_id)
    if skipped:
        log.info("skipping %d finished subject(s): %s", len(skipped), ", ".join(skipped[:10]))
    generated, done, failed = 0, [], {}
    if todo:
        connect_ray(fan.address)
        if train_cfg.with_prior_preservation:
            generated = pregenerate_class_images(manifest, configs, base_model, class_cache,
                                                 actors=fan.class_image_actors)
        done, failed = _run_groups(manifest_uri, registry, base_model, configs, fan, run_id, class_cache, progress)
    done = [s for s in todo if s in set(done)]
    failed = {s: failed.get(s) or "unknown" for s in todo if s not in set(done)}
    summary = RunSummary(run_id, done, failed, skipped, time.perf_counter() - t0, generated)
    registry.update_run(run_id, state="finished", finished_at=now(), done=done, failed=failed,
                        wall_time_s=round(summary.wall_time_s, 2), class_images_generated=generated)
    return summary


def _mark_queued(registry, manifest, todo: list[str], run_id: str) -> None:
    """Every subject of the run ``queued`` in the registry (in parallel: one object each)."""
    records = {sid: manifest.record(sid) for sid in todo}

    def queued(sid: str) -> None:
        registry.update_state(sid, state="queued", run_id=run_id, error=None, attempts=0,
                              class_noun=records[sid].class_noun, tenant=records[sid].tenant)

    concurrently(queued, todo)


def _run_groups(manifest_uri, registry, base_model, configs, fan: FanoutConfig, run_id, class_cache,
                progress) -> tuple[list[str], dict[str, str]]:
    """Train ``configs`` on worker groups; this run's done subjects, and its failed ones with errors."""
    import ray

    from dreamfleet.control.console import RunConsole

    queue, queue_name = _start_queue(registry, list(configs), fan.max_retries, run_id)
    run_group = _group_runner(manifest_uri, registry, base_model, configs, fan, run_id, class_cache, queue, queue_name)
    console = RunConsole(registry, {sid: c.steps for sid, c in configs.items()}, enabled=progress)

    def show(final: bool = False) -> None:
        console.update(ray.get(queue.progress.remote()), final=final)

    try:
        for _ in range(1 + fan.max_retries):  # relaunch groups while retriable work remains
            threads = [threading.Thread(target=run_group, args=(g,), daemon=True)
                       for g in range(min(fan.max_concurrent, len(configs)))]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                show()
                time.sleep(1.0)
            if ray.get(queue.remaining.remote()) == 0:
                break
        never = "no worker group could train it (see the run's logs)"
        for sid in ray.get(queue.pending_subjects.remote()):
            registry.update_state(sid, state="failed", error=never)
        show(final=True)
        done, failed = ray.get(queue.outcome.remote())
        return done, {**dict.fromkeys(configs, never), **failed}
    finally:
        ray.kill(queue)


def _start_queue(registry, subjects: list[str], max_retries: int, run_id: str):
    """The run's subject queue actor and its name. It lives beside the driver (the head, for a
    Ray Job): a worker node lost mid-run must not take the run's leases with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from dreamfleet.control.queue import SubjectQueue

    name = f"dreamfleet-queue-{run_id}"
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    queue = ray.remote(num_cpus=0)(SubjectQueue).options(name=name, namespace=NAMESPACE, scheduling_strategy=here)
    return queue.remote(registry.uri, subjects, max_retries), name


def _group_runner(manifest_uri, registry, base_model, configs, fan: FanoutConfig, run_id, class_cache, queue,
                  queue_name) -> Callable[[int], None]:
    """``run_group(g)``: worker group ``g`` as a Ray Train run, taking subjects from the queue
    until it is empty; a group that gives up hands its leased subjects back."""
    import ray

    from dreamfleet.control.progress import StateTracker
    from dreamfleet.trainers.runtime import GroupConfig, fanout_worker

    max_failures = (fan.max_retries + 1) * len(configs)

    def run_group(group: int) -> None:
        gc = GroupConfig(
            run_id=run_id, group=group, queue_name=queue_name, namespace=NAMESPACE, manifest=manifest_uri,
            registry=registry.uri, base_model=base_model, configs=configs, tracker=StateTracker,
            zero_stage=fan.zero_stage, offload=fan.offload, class_cache=class_cache, pack=fan.pack,
            state_every_s=fan.state_every_s,
        )
        trainer = worker_group(
            fanout_worker, gc.as_loop_config(), name=f"{run_id}-g{group}-{uuid.uuid4().hex[:4]}",
            workers=fan.workers_per_subject, cpus_per_worker=fan.cpus_per_worker,
            gpus_per_worker=fan.gpus_per_worker, storage=registry.checkpoint_storage, max_failures=max_failures,
        )
        try:
            trainer.fit()
        except Exception as e:  # the group gave up; its leased subject is retried elsewhere or failed
            log.error("worker group %d stopped: %s", group, e)
            ray.get(queue.group_exited.remote(group, f"worker group failed: {type(e).__name__}: {e}"))

    return run_group


# --------------------------------------------------------------------------- class images, with Ray Data


class _ClassImageGenerator:
    """A Ray Data actor: loads the base model once, generates class images by index."""

    def __init__(self, base_model: str, cache_root: str | None):
        from dreamfleet.core.models import load_base
        from dreamfleet.trainers.class_images import ClassImageCache

        self.base = load_base(base_model, fresh=False)
        self.cache = ClassImageCache(cache_root)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import json

        from dreamfleet.trainers.class_images import ClassImageRequest

        out = []
        for req_json, indices_json in zip(batch["request"], batch["indices"], strict=True):
            req = ClassImageRequest(**json.loads(req_json))
            indices = json.loads(indices_json)
            out.append(self.cache.fill(self.base, req, indices))
        return {"generated": out}


def pregenerate_class_images(manifest, configs: dict[str, TrainConfig], base_model, cache_root, *,
                             actors: int = 1) -> int:
    """Generate every missing class image of the run once per class, as a Ray Data batch job."""
    import json

    import ray

    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest
    base = load_base(base_model, fresh=False)
    cache = ClassImageCache(cache_root)
    requests: dict[str, ClassImageRequest] = {}
    for sid, c in configs.items():
        if not c.with_prior_preservation:
            continue
        req = ClassImageRequest.for_config(c, c.class_prompt.format(class_noun=manifest.record(sid).class_noun,
                                                                    identifier=""))
        key = req.key(base) + str(req.count)
        if key not in requests or requests[key].count < req.count:
            requests[key] = req
    rows = []
    for req in requests.values():
        have = cache.available(base, req)
        missing = [i for i in range(req.count) if i not in have]
        for start in range(0, len(missing), 8):
            rows.append({"request": json.dumps(dataclasses.asdict(req)), "indices": json.dumps(missing[start:start + 8])})
    if not rows:
        return 0
    log.info("generating class images for %d class(es) with Ray Data (%d chunks)", len(requests), len(rows))
    ds = ray.data.from_items(rows).map_batches(
        _ClassImageGenerator, fn_constructor_args=(base_model, cache_root), batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(rows))), num_cpus=1,
    )
    generated = sum(int(r["generated"]) for r in ds.take_all())
    for req in requests.values():  # record the cache metadata (a full hit now)
        cache.ensure(base, req)
    return generated
