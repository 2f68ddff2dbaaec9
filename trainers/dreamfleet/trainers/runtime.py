"""The thin distributed runtime: Ray Train worker groups and DeepSpeed around the one loop.

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

Nothing here imports the control plane: the queue is reached through its actor handle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreamfleet.core.config import from_dict, to_dict
from dreamfleet.core.errors import ConfigError, DreamfleetError
from dreamfleet.core.hashing import sha256_json
from dreamfleet.core.models import load_base
from dreamfleet.registry.store import now
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.dreambooth import (
    DreamBoothObjective,
    SubjectData,
    loop_settings,
    prepare_subject,
    publish_expert,
    setup_trainable,
    validation_images,
)
from dreamfleet.trainers.loop import Engine, LocalEngine, LoopHooks, LoopSettings, make_scheduler, run_loop

log = logging.getLogger("dreamfleet")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistContext:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            return cls(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return cls()

    def broadcast(self, obj: Any) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        if self.world_size == 1:
            return ok
        import torch.distributed as tdist

        flag = torch.tensor([0 if ok else 1])
        tdist.all_reduce(flag)
        return int(flag.item()) == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as tdist

            tdist.barrier()


# --------------------------------------------------------------------------- engines


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend compiles its shared-memory all-reduce op with g++ in
    ``init_distributed`` (~50 s on 2 cores, again on every new machine or virtualenv). That op
    serves only ``inference_all_reduce`` (tensor-parallel inference); ZeRO training reduces
    through the gloo process group either way, so a CPU training run does not build it.
    ``deepspeed.ops.__compatible_ops__`` is one cached dict that DeepSpeed keeps edits to."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedEngine:
    """The loop's Engine over ``deepspeed.initialize`` (ZeRO stage 2 or 3, optional CPU offload).

    Ray Train has already created the process group (gloo on CPU, NCCL on GPU); DeepSpeed
    adopts it. The loop divides the loss by the accumulation steps itself, so DeepSpeed's
    own scaling is switched off, and the micro-steps inside one optimizer step are stepped
    through DeepSpeed so that it knows where the accumulation boundary is.
    """

    def __init__(self, objective, s: LoopSettings, stage: int, offload: bool):
        import deepspeed

        if getattr(objective.cfg, "train_text_encoder", False):
            raise ConfigError("train_text_encoder is not supported with DeepSpeed ZeRO here; use --zero-stage 0")
        self.objective, self.s = objective, s
        params = [p for p in objective.unet.parameters() if p.requires_grad]
        ds_config = {
            "train_micro_batch_size_per_gpu": objective.cfg.batch_size,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "gradient_clipping": s.max_grad_norm,
            "zero_optimization": {"stage": stage},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": s.learning_rate, "betas": [s.adam_beta1, s.adam_beta2], "eps": s.adam_epsilon,
                           "weight_decay": s.adam_weight_decay, **({} if offload else {"torch_adam": True})},
            },
            "bf16": {"enabled": s.autocast_dtype == torch.bfloat16},
            "fp16": {"enabled": s.autocast_dtype == torch.float16},
            "checkpoint": {"use_node_local_storage": True},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if offload:
            ds_config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if s.device.type == "cpu":
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="gloo" if s.device.type == "cpu" else "nccl")
        self.engine, _, _, _ = deepspeed.initialize(
            model=objective.unet,
            model_parameters=params,
            config=ds_config,
            lr_scheduler=lambda opt: make_scheduler(opt, s),
        )
        self.stage = stage
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro < self.s.gradient_accumulation_steps:
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def step(self) -> dict[str, float]:
        self.engine.step()
        self._micro = 0
        out = {"lr": float(self.engine.get_lr()[0])}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            out["grad_norm"] = float(norm)
        return out

    def save(self, folder: Path, *, is_main: bool) -> None:
        self.engine.save_checkpoint(str(folder), tag="ds")

    def load(self, folder: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")

    def full_unet_state(self) -> dict[str, torch.Tensor] | None:
        """The consolidated full weights (collective under ZeRO-3; rank 0 gets the dict)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return None


def build_engine(objective, s: LoopSettings, dist: DistContext, zero_stage: int, offload: bool) -> Engine:
    if zero_stage in (2, 3):
        return DeepSpeedEngine(objective, s, zero_stage, offload)
    if zero_stage != 0:
        raise ConfigError(f"zero_stage must be 0, 2 or 3, got {zero_stage}")
    if offload:
        raise ConfigError("--offload needs DeepSpeed: pass --zero-stage 2 or 3")
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [s.device.index or 0] if s.device.type == "cuda" else None
        objective.forward_unet = DistributedDataParallel(objective.unet, device_ids=device_ids)
    return LocalEngine(objective, s)


# --------------------------------------------------------------------------- one subject on one rank


def subject_config(base_cfg: dict[str, Any], record) -> TrainConfig:
    """The run's TrainConfig with the manifest's per-subject overrides applied."""
    data = dict(base_cfg)
    data.update(getattr(record, "train_overrides", None) or {})
    for name in ("steps", "learning_rate", "method"):
        value = getattr(record, name, None)
        if value is not None:
            data[name] = value
    return from_dict(TrainConfig, data, where=f"subject {record.subject_id!r}")


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
    train_config: dict[str, Any]
    zero_stage: int = 0
    offload: bool = False
    class_cache: str | None = None
    state_every_s: float = 1.0
    pack: int = 1


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
        while leases := _lease_many(queue, gc.group, gc.pack):
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


def _lease_many(queue, group: int, n: int) -> list[tuple[str, int]]:
    import ray

    return [tuple(lease) for lease in ray.get(queue.lease_many.remote(group, n))]


def _train_pack(gc: GroupConfig, queue, registry, manifest, leases: list[tuple[str, int]]) -> None:
    """Several subjects' LoRA experts in one packed run (:mod:`dreamfleet.trainers.packing`) on this worker.

    A subject that fails to prepare fails alone; subjects whose configs cannot pack (they differ
    in more than the seed) are trained one after another instead. A packed run that fails is
    retried as a whole. Packs are not checkpointed to Ray Train: a restarted pack starts over.
    """
    import ray

    from dreamfleet.trainers.packing import (
        PackedEngine,
        check_packable,
        packed_loop_settings,
        packed_objective,
        setup_packed,
        subject_result,
    )

    solo = DistContext()
    t0 = time.perf_counter()
    base = load_base(gc.base_model)  # one base model shared by the pack
    ready = []
    for subject_id, attempt in leases:
        try:
            ready.append((attempt, _prepare_leased(gc, manifest, subject_id, base)))
        except DreamfleetError as e:
            ray.get(queue.finish.remote(gc.group, subject_id, False, str(e), False))
    if len(ready) == 1:  # nothing to pack with: the ordinary path, with checkpoints reported to Ray Train
        attempt, p = ready[0]
        _train_leased(gc, solo, queue, registry, manifest, p.subject.subject_id, attempt)
        return
    if not ready:
        return
    try:
        check_packable([p for _, p in ready])
    except ConfigError as e:
        log.warning("subjects %s do not pack (%s); training them one at a time",
                    [p.subject.subject_id for _, p in ready], e)
        for attempt, p in ready:
            _train_leased(gc, solo, queue, registry, manifest, p.subject.subject_id, attempt)
        return
    prepared = [p for _, p in ready]
    ids = [p.subject.subject_id for p in prepared]
    for attempt, p in ready:
        registry.update_state(p.subject.subject_id, state="training", run_id=gc.run_id, total_steps=p.cfg.steps,
                              attempts=attempt, error=None, class_noun=p.subject.class_noun, tenant=p.subject.tenant,
                              worker={"group": gc.group, "node": socket.gethostname(), "pids": [os.getpid()],
                                      "packed_with": ids})
    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-pack-{ids[0]}-"))
    try:
        packed = setup_packed(prepared)
        objective = packed_objective(prepared, packed)
        settings = packed_loop_settings(prepared, progress=False)
        trackers = [_StateTracker(registry, sid, solo, gc.state_every_s, 0) for sid in ids]
        works = [work / f"s{i}" for i in range(len(ids))]
        for w in works:
            (w / "validation").mkdir(parents=True)

        def on_step(step: int, metrics: dict[str, float]) -> None:
            for sid, tracker in zip(ids, trackers, strict=True):
                prefix = f"{sid}/"
                tracker.on_step(step, {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)})

        def on_validation(step: int) -> None:
            from dreamfleet.core.images import image_grid

            for i, (p, w) in enumerate(zip(prepared, works, strict=True)):
                packed.select(i)
                grid = image_grid(validation_images(p), rows=len(p.cfg.validation_prompts),
                                  cols=p.cfg.num_validation_images)
                grid.save(w / "validation" / f"step-{step:08d}.png")

        try:
            result = run_loop(objective, settings, checkpoint_dir=None,  # packs are not resumed: see above
                              hooks=LoopHooks(on_step=on_step, on_validation=on_validation),
                              engine=PackedEngine(objective, settings))
        except Exception as e:
            for sid in ids:
                ray.get(queue.finish.remote(gc.group, sid, False, f"packed run failed: {type(e).__name__}: {e}", True))
            return
        wall = time.perf_counter() - t0
        for i, ((attempt, p), w, tracker) in enumerate(zip(ready, works, trackers, strict=True)):
            sid = ids[i]
            tracker.flush(force=True)
            out = w / "expert"
            publish_expert(p, subject_result(result, sid), out, w, wall_time_s=wall, overwrite=True,
                           unet_lora=packed.adapter(i),
                           extra_stats={"attempt": attempt, "world_size": 1, "zero_stage": 0,
                                        "steps_executed": tracker.steps_executed, "run_id": gc.run_id,
                                        "packed": {"subjects": ids, "index": i}})
            _mark_done(gc, queue, registry, sid, out, result.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prepare_leased(gc: GroupConfig, manifest, subject_id: str, base):
    """The leased subject's photos from the manifest, its config with the manifest's overrides, prepared."""
    record = manifest.record(subject_id)
    images = [im for _, im, _ in manifest.read_images(subject_id)]
    subject = SubjectData(subject_id, record.class_noun, images, identifier=record.identifier,
                          tenant=record.tenant, source=f"{gc.manifest}#{subject_id}")
    cache = ClassImageCache(gc.class_cache) if gc.class_cache else None
    return prepare_subject(subject, base, subject_config(gc.train_config, record), class_cache=cache)


def _train_leased(gc: GroupConfig, dist: DistContext, queue, registry, manifest, subject_id: str, attempt: int) -> None:
    import ray
    import ray.train

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-{subject_id}-r{dist.rank}-"))
    try:
        # 1. Prepare on every rank; a user-fixable problem fails this subject alone, at once.
        error = None
        try:
            base = load_base(gc.base_model)
            p = _prepare_leased(gc, manifest, subject_id, base)
            subject = p.subject
        except DreamfleetError as e:
            error = str(e)
        if not dist.all_ok(error is None):
            if dist.is_main:
                ray.get(queue.finish.remote(gc.group, subject_id, False, error or "failed on another rank", False))
            return
        key = checkpoint_key(subject_id, p.cfg, subject.input_hash(), base.model_hash, gc.zero_stage, dist.world_size)

        # 2. Resume from the subject's last reported checkpoint, if it matches.
        ckpt_dir = work / "checkpoints"
        ckpt_dir.mkdir()
        state = registry.get_state(subject_id)
        resumed = None
        if state is not None and state.checkpoint and (state.worker or {}).get("checkpoint_key") == key:
            target = ckpt_dir / f"step-{state.checkpoint_step:08d}"
            try:
                registry.download(state.checkpoint, target)
                resumed = state.checkpoint_step
            except Exception as e:  # a checkpoint that vanished: start over rather than fail
                log.warning("subject %r: checkpoint %s unusable (%s); starting from step 0", subject_id, state.checkpoint, e)
                shutil.rmtree(target, ignore_errors=True)
        steps_executed = int((state.worker or {}).get("steps_executed", 0)) if state else 0
        if dist.is_main:
            registry.update_state(
                subject_id, state="training", run_id=gc.run_id, total_steps=p.cfg.steps, attempts=attempt,
                error=None, class_noun=subject.class_noun, tenant=subject.tenant,
                started_at=state.started_at if state and state.started_at else None,
                worker={"group": gc.group, "node": socket.gethostname(), "pids": _gather_pids(dist),
                        "checkpoint_key": key, "steps_executed": steps_executed, "resumed_from": resumed},
            )
        else:
            _gather_pids(dist)

        # 3. Train.
        setup_trainable(p)
        objective = DreamBoothObjective.from_prepared(p, rank=dist.rank)
        settings = loop_settings(p.cfg, p, progress=False)
        engine = build_engine(objective, settings, dist, gc.zero_stage, gc.offload)
        (work / "validation").mkdir()
        tracker = _StateTracker(registry, subject_id, dist, gc.state_every_s, steps_executed)

        def on_validation(step: int) -> None:
            from dreamfleet.core.images import image_grid

            images = validation_images(p)  # every rank: under ZeRO-3 forward passes are collective
            if dist.is_main:
                grid = image_grid(images, rows=len(p.cfg.validation_prompts), cols=p.cfg.num_validation_images)
                grid.save(work / "validation" / f"step-{step:08d}.png")

        def on_checkpoint(step: int, path: Path) -> None:
            from ray.train import Checkpoint

            name = f"{subject_id}-{key[:8]}-step{step:08d}"
            ray.train.report({"subject_id": subject_id, "step": step, "loss": tracker.last_loss},
                             checkpoint=Checkpoint.from_directory(str(path)), checkpoint_dir_name=name)
            if dist.is_main:
                # Ray persists it under the registry's checkpoint storage; record it relative to the registry.
                rel = f"checkpoints/{ray.train.get_context().get_storage().experiment_dir_name}/{name}"
                tracker.flush(force=True, checkpoint=rel, checkpoint_step=step)

        hooks = LoopHooks(on_step=tracker.on_step, on_validation=on_validation, on_checkpoint=on_checkpoint)
        try:
            result = run_loop(objective, settings, checkpoint_dir=ckpt_dir, hooks=hooks, engine=engine,
                              is_main=dist.is_main, config=to_dict(p.cfg))
            unet_state = engine.full_unet_state() if isinstance(engine, DeepSpeedEngine) else None
        except Exception as e:
            if dist.world_size > 1:
                raise  # the other ranks may be blocked in a collective: let Ray Train restart the group
            ray.get(queue.finish.remote(gc.group, subject_id, False, f"{type(e).__name__}: {e}", True))
            return

        # 4. Publish (rank 0).
        if dist.is_main:
            tracker.flush(force=True)
            out = work / "expert"
            publish_expert(p, result, out, work, wall_time_s=time.perf_counter() - t0, overwrite=True,
                           unet_state=unet_state,
                           extra_stats={"attempt": attempt, "world_size": dist.world_size, "zero_stage": gc.zero_stage,
                                        "steps_executed": tracker.steps_executed, "run_id": gc.run_id})
            _mark_done(gc, queue, registry, subject_id, out, result.final_step)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mark_done(gc: GroupConfig, queue, registry, subject_id: str, expert_dir: Path, step: int) -> None:
    """Publish a written expert folder to the registry and tell the queue the subject is done."""
    import ray

    version = registry.publish(subject_id, expert_dir)
    registry.update_state(subject_id, state="done", version=version, error=None, finished_at=now(), step=step)
    ray.get(queue.finish.remote(gc.group, subject_id, True, None, False))


def _gather_pids(dist: DistContext) -> list[int]:
    if dist.world_size == 1:
        return [os.getpid()]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(out, os.getpid())
    return [int(x) for x in out]


class _StateTracker:
    """Rank 0 writes step and loss to the registry, at most every ``every_s`` seconds."""

    def __init__(self, registry, subject_id: str, dist: DistContext, every_s: float, steps_executed: int):
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



# --------------------------------------------------------------------------- the apprentice


@dataclass
class ApprenticeRunConfig:
    demo_set: str
    base_model: str
    out: str
    train_config: dict[str, Any]
    zero_stage: int = 0
    offload: bool = False


def apprentice_worker(config: dict[str, Any]) -> None:
    """Ray Train ``train_loop_per_worker`` for the apprentice: the same loop, DDP or DeepSpeed.

    Every rank draws its own batches (stream = rank); checkpoints are reported to Ray Train,
    so a restarted group resumes from the last one; rank 0 publishes the apprentice folder.
    """
    import ray.train

    from dreamfleet.trainers.apprentice import (
        ApprenticeConfig,
        ApprenticeObjective,
        apprentice_loop_settings,
        prepare_apprentice,
        publish_apprentice,
    )

    rc = ApprenticeRunConfig(**config)
    t0 = time.perf_counter()
    ctx = ray.train.get_context()
    dist = DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    c = from_dict(ApprenticeConfig, rc.train_config)
    p = prepare_apprentice(rc.demo_set, rc.base_model, c)
    objective = ApprenticeObjective(p, rank=dist.rank)
    settings = apprentice_loop_settings(p, progress=False)
    engine = build_engine(objective, settings, dist, rc.zero_stage, rc.offload)
    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-apprentice-r{dist.rank}-"))
    try:
        ckpt_dir = work / "checkpoints"
        ckpt_dir.mkdir()
        resume = ray.train.get_checkpoint()
        if resume is not None:
            with resume.as_directory() as d:
                state = json.loads((Path(d) / "state.json").read_text())
                shutil.copytree(d, ckpt_dir / f"step-{int(state['step']):08d}")

        def on_checkpoint(step: int, path: Path) -> None:
            from ray.train import Checkpoint

            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(path)),
                             checkpoint_dir_name=f"apprentice-step{step:08d}")

        def on_step(step: int, metrics: dict[str, float]) -> None:
            if dist.is_main and step % 50 == 0:
                log.info("apprentice step %d/%d loss %.4f", step, settings.steps, metrics["loss"])

        result = run_loop(objective, settings, checkpoint_dir=ckpt_dir, engine=engine, is_main=dist.is_main,
                          hooks=LoopHooks(on_step=on_step, on_checkpoint=on_checkpoint))
        full = engine.full_unet_state() if isinstance(engine, DeepSpeedEngine) else None
        if dist.is_main:
            publish_apprentice(p, result, Path(rc.out), wall_time_s=time.perf_counter() - t0, full_state=full,
                               extra_stats={"world_size": dist.world_size, "zero_stage": rc.zero_stage})
        dist.barrier()
        ray.train.report({"step": result.final_step, "loss": result.final_loss or 0.0})
    finally:
        shutil.rmtree(work, ignore_errors=True)
