"""The fan-out worker: Ray Train worker groups that lease subjects and train them with the one loop.

A *worker group* is one Ray Train ``TorchTrainer`` of N workers. It lives for a whole run
and takes subjects one at a time from a queue (a Ray actor owned by the orchestrator), so
the ~20 s start and ~7 s teardown of a ``fit()`` are paid once per group, not per subject.
Each subject is still trained by all N workers together (DDP, or DeepSpeed ZeRO-2/3 with
optional CPU offload) and keeps its own checkpoints, failures and metrics:

- every rank prepares the subject; a data or config error fails that subject alone;
- checkpoints are reported to Ray Train (``ray.train.report``) and their persisted path is
  recorded in the subject's registry state, so a restarted group (``FailureConfig``) or a
  restarted driver resumes the subject from its last checkpoint, not from step 0;
- rank 0 publishes the finished expert to the registry (consolidated full weights under ZeRO-3).

Nothing here imports the control plane: the queue is reached through its actor handle, and
progress goes to the tracker the control plane passes in (``GroupConfig.tracker``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError, DreamfleetError
from dreamfleet.core.hashing import sha256_json
from dreamfleet.core.models import load_base
from dreamfleet.registry.store import now
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import FitOptions, fit, prepare_any
from dreamfleet.trainers.loop import LoopHooks
from dreamfleet.trainers.parallelize import DistContext, gather_pids

log = logging.getLogger("dreamfleet")


def ray_node() -> str | None:
    """The Ray node id this process runs on (hosts can share a name; node ids do not)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def checkpoint_key(subject_id: str, cfg: TrainConfig, input_hash: str, base_hash: str, zero_stage: int, world: int) -> str:
    """Checkpoints resume only into the same subject data, config, base model and topology."""
    return sha256_json({"s": subject_id, "c": to_dict(cfg), "i": input_hash, "b": base_hash, "z": zero_stage, "w": world})[:16]


@dataclass
class GroupConfig:
    run_id: str
    group: int
    queue_name: str
    namespace: str
    manifest: str
    registry: str
    base_model: str
    configs: dict[str, TrainConfig]  # each subject's, resolved on the driver
    # The progress hook from the control plane: tracker(registry, subject_id, dist, every_s,
    # steps_executed) has on_step(step, metrics), flush(force=, **state), steps_executed, last_loss.
    tracker: Callable[..., Any]
    zero_stage: int = 0
    offload: bool = False
    class_cache: str | None = None
    state_every_s: float = 1.0
    pack: int = 1

    def as_loop_config(self) -> dict[str, Any]:
        """``train_loop_config`` for Ray Train: the fields as they are (configs stay TrainConfig objects)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fanout_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` of a worker group: subjects from the queue until empty."""
    import ray
    import ray.train

    from dreamfleet.data.manifest import Manifest
    from dreamfleet.registry import Registry

    gc = GroupConfig(**config)
    ctx = ray.train.get_context()
    dist = DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    queue = ray.get_actor(gc.queue_name, namespace=gc.namespace)
    registry = Registry(gc.registry)
    manifest = Manifest.open(gc.manifest)
    if gc.pack > 1:  # one worker (checked by FanoutConfig): lease up to `pack` subjects, train them packed
        while leases := [tuple(x) for x in ray.get(queue.lease_many.remote(gc.group, gc.pack))]:
            _train_pack(gc, queue, registry, manifest, leases)
        return
    while True:
        lease = ray.get(queue.lease.remote(gc.group)) if dist.is_main else None
        lease = dist.broadcast(lease)
        if lease is None:
            break
        subject_id, attempt = lease
        _train_leased(gc, dist, queue, registry, manifest, subject_id, attempt)
        dist.barrier()


def _train_pack(gc: GroupConfig, queue, registry, manifest, leases: list[tuple[str, int]]) -> None:
    """Several subjects' LoRA experts in one packed run (:mod:`dreamfleet.trainers.packing`) on this worker.

    A subject that fails to prepare fails alone; subjects whose configs cannot pack (they differ
    in more than the seed) are trained one after another instead. A packed run that fails is
    retried as a whole. Packs are not checkpointed to Ray Train: a restarted pack starts over.
    """
    import ray

    from dreamfleet.trainers.packing import check_packable

    t0 = time.perf_counter()
    solo = [(sid, attempt) for sid, attempt in leases if gc.configs[sid].method == "profusion"]
    for subject_id, attempt in solo:  # ProFusion adds its own q/k/v adapter to the base: never packed
        _train_leased(gc, DistContext(), queue, registry, manifest, subject_id, attempt)
    leases = [lease for lease in leases if lease not in solo]
    base = load_base(gc.base_model) if leases else None  # one base model shared by the pack
    ready = []
    for subject_id, attempt in leases:
        try:
            ready.append((attempt, _prepare_leased(gc, manifest, subject_id, base)))
        except DreamfleetError as e:
            ray.get(queue.finish.remote(gc.group, subject_id, False, str(e), False))
    try:
        if len(ready) > 1:
            check_packable([p for _, p in ready])
    except ConfigError as e:
        log.warning("subjects %s do not pack (%s); training them one at a time",
                    [p.subject.subject_id for _, p in ready], e)
        for attempt, p in ready:
            _train_leased(gc, DistContext(), queue, registry, manifest, p.subject.subject_id, attempt)
        return
    if len(ready) == 1:  # nothing to pack with: the ordinary path, with checkpoints reported to Ray Train
        attempt, p = ready[0]
        _train_leased(gc, DistContext(), queue, registry, manifest, p.subject.subject_id, attempt)
    elif ready:
        _run_pack(gc, queue, registry, ready, t0)


def _run_pack(gc: GroupConfig, queue, registry, ready: list[tuple[int, Any]], t0: float) -> None:
    """Train prepared, packable subjects together (not resumable: see :func:`_train_pack`); publish each expert."""
    import ray

    prepared = [p for _, p in ready]
    ids = [p.subject.subject_id for p in prepared]
    for attempt, p in ready:
        registry.update_state(p.subject.subject_id, state="training", run_id=gc.run_id, total_steps=p.cfg.steps,
                              attempts=attempt, error=None, class_noun=p.subject.class_noun, tenant=p.subject.tenant,
                              worker={"group": gc.group, "node": socket.gethostname(), "ray_node": ray_node(), "pids": [os.getpid()],
                                      "packed_with": ids})
    trackers = [gc.tracker(registry, sid, DistContext(), gc.state_every_s, 0) for sid in ids]

    def on_step(step: int, metrics: dict[str, float]) -> None:
        for sid, tracker in zip(ids, trackers, strict=True):
            prefix = f"{sid}/"
            tracker.on_step(step, {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)})

    def stats(i: int) -> dict[str, Any]:
        return {"attempt": ready[i][0], "world_size": 1, "zero_stage": 0,
                "steps_executed": trackers[i].steps_executed, "run_id": gc.run_id}

    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-pack-{ids[0]}-"))
    works = [work / f"s{i}" for i in range(len(ids))]
    try:
        try:
            results = fit(prepared, works, [w / "expert" for w in works], FitOptions(progress=False, packed=True),
                          hooks=LoopHooks(on_step=on_step), extra_stats=stats, started=t0)
        except Exception as e:
            for sid in ids:
                ray.get(queue.finish.remote(gc.group, sid, False, f"packed run failed: {type(e).__name__}: {e}", True))
            return
        finally:
            for tracker in trackers:
                tracker.flush(force=True)
        for sid, r in zip(ids, results, strict=True):
            _mark_done(gc, queue, registry, sid, r.expert_dir, r.loop.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_leased(gc: GroupConfig, manifest, subject_id: str, base):
    """The leased subject's photos from the manifest, its config with the manifest's overrides, prepared."""
    record = manifest.record(subject_id)
    samples = manifest.read_images(subject_id)
    cfg = gc.configs[subject_id]
    captions = [meta.get("caption") for _, _, meta in samples] if cfg.captions else None
    masks = [meta.get("mask") for _, _, meta in samples] if cfg.masked_loss else None
    subject = SubjectData(subject_id, record.class_noun, [im for _, im, _ in samples], identifier=record.identifier,
                          tenant=record.tenant, source=f"{gc.manifest}#{subject_id}", captions=captions,
                          prompts=list(record.eval_prompts) or None, masks=masks)
    cache = ClassImageCache(gc.class_cache) if gc.class_cache else None
    return prepare_any(subject, base, gc.configs[subject_id], class_cache=cache)


def _prepare_on_all_ranks(gc: GroupConfig, dist: DistContext, queue, manifest, subject_id: str):
    """(prepared subject, base) on every rank; a user-fixable problem on any rank fails this
    subject alone, at once, and gives (None, None)."""
    import ray

    error, p, base = None, None, None
    try:
        base = load_base(gc.base_model)
        p = _prepare_leased(gc, manifest, subject_id, base)
    except DreamfleetError as e:
        error = str(e)
    if dist.all_ok(error is None):
        return p, base
    if dist.is_main:
        ray.get(queue.finish.remote(gc.group, subject_id, False, error or "failed on another rank", False))
    return None, None


def _restore_checkpoint(registry, subject_id: str, key: str, ckpt_dir: Path):
    """(registry state, step) of the subject's last reported checkpoint, downloaded into
    ``ckpt_dir`` when it was written for the same ``key``; step is None when there is none."""
    state = registry.get_state(subject_id)
    if state is None or not state.checkpoint or (state.worker or {}).get("checkpoint_key") != key:
        return state, None
    target = ckpt_dir / f"step-{state.checkpoint_step:08d}"
    try:
        registry.download(state.checkpoint, target)
        return state, state.checkpoint_step
    except Exception as e:  # a checkpoint that vanished: start over rather than fail
        log.warning("subject %r: checkpoint %s unusable (%s); starting from step 0", subject_id, state.checkpoint, e)
        shutil.rmtree(target, ignore_errors=True)
        return state, None


def _announce(gc: GroupConfig, dist: DistContext, registry, p, attempt: int, key: str, state, resumed) -> int:
    """Mark the subject training in the registry (rank 0; every rank joins the PID gather);
    returns the steps executed by earlier attempts."""
    steps_executed = int((state.worker or {}).get("steps_executed", 0)) if state else 0
    pids = gather_pids(dist)
    if dist.is_main:
        registry.update_state(
            p.subject.subject_id, state="training", run_id=gc.run_id, total_steps=p.cfg.steps, attempts=attempt,
            error=None, class_noun=p.subject.class_noun, tenant=p.subject.tenant,
            started_at=state.started_at if state and state.started_at else None,
            worker={"group": gc.group, "node": socket.gethostname(), "ray_node": ray_node(), "pids": pids,
                    "checkpoint_key": key, "steps_executed": steps_executed, "resumed_from": resumed},
        )
    return steps_executed


def _checkpoint_reporter(dist: DistContext, subject_id: str, key: str, tracker):
    """The loop's ``on_checkpoint``: report the checkpoint to Ray Train, which persists it under
    the registry's checkpoint storage, and record where in the subject's registry state."""
    import ray.train

    def on_checkpoint(step: int, path: Path) -> None:
        from ray.train import Checkpoint

        name = f"{subject_id}-{key[:8]}-step{step:08d}"
        ray.train.report({"subject_id": subject_id, "step": step, "loss": tracker.last_loss},
                         checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=name)
        if dist.is_main:
            rel = f"checkpoints/{ray.train.get_context().get_storage().experiment_dir_name}/{name}"
            tracker.flush(force=True, checkpoint=rel, checkpoint_step=step)

    return on_checkpoint


def _train_leased(gc: GroupConfig, dist: DistContext, queue, registry, manifest, subject_id: str, attempt: int) -> None:
    """One leased subject on every rank of the group: prepare, resume, train, publish (rank 0)."""
    import ray

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-{subject_id}-r{dist.rank}-"))
    try:
        p, base = _prepare_on_all_ranks(gc, dist, queue, manifest, subject_id)
        if p is None:
            return
        key = checkpoint_key(subject_id, p.cfg, p.subject.input_hash(), base.model_hash, gc.zero_stage, dist.world_size)
        opts = FitOptions(checkpoint_dir=work / "checkpoints", dist=dist, zero_stage=gc.zero_stage,
                          offload=gc.offload, progress=False)
        opts.checkpoint_dir.mkdir()
        state, resumed = _restore_checkpoint(registry, subject_id, key, opts.checkpoint_dir)
        tracker = gc.tracker(registry, subject_id, dist,
                               gc.state_every_s, _announce(gc, dist, registry, p, attempt, key, state, resumed))
        hooks = LoopHooks(on_step=tracker.on_step, on_checkpoint=_checkpoint_reporter(dist, subject_id, key, tracker))
        stats = {"attempt": attempt, "world_size": dist.world_size, "zero_stage": gc.zero_stage, "run_id": gc.run_id}
        try:
            results = fit([p], [work], [work / "expert"], opts, hooks=hooks, started=t0,
                          extra_stats=lambda _: {**stats, "steps_executed": tracker.steps_executed})
        except Exception as e:
            if dist.world_size > 1:
                raise  # the other ranks may be blocked in a collective: let Ray Train restart the group
            ray.get(queue.finish.remote(gc.group, subject_id, False, f"{type(e).__name__}: {e}", True))
            return
        if dist.is_main:
            tracker.flush(force=True)
            _mark_done(gc, queue, registry, subject_id, work / "expert", results[0].loop.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mark_done(gc: GroupConfig, queue, registry, subject_id: str, expert_dir: Path, step: int) -> None:
    """Publish a written expert folder to the registry and tell the queue the subject is done."""
    import ray

    version = registry.publish(subject_id, expert_dir)
    registry.update_state(subject_id, state="done", version=version, error=None, finished_at=now(), step=step)
    ray.get(queue.finish.remote(gc.group, subject_id, True, None, False))
