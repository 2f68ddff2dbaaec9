"""Ray Train's ``train_loop_per_worker`` for the apprentice: the same loop as in process,
under DDP or DeepSpeed (``parallelize``), checkpoints reported to Ray Train."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamfleet.core.config import from_dict
from dreamfleet.trainers.parallelize import DeepSpeedEngine, DistContext, build_engine
from dreamfleet.trainers.ray_loop import run_on_ray

log = logging.getLogger("dreamfleet")


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
    result = run_on_ray(objective, settings, engine, dist, name="apprentice")
    full = engine.full_unet_state() if isinstance(engine, DeepSpeedEngine) else None
    if dist.is_main:
        publish_apprentice(p, result, Path(rc.out), wall_time_s=time.perf_counter() - t0, full_state=full,
                           extra_stats={"world_size": dist.world_size, "zero_stage": rc.zero_stage})
    dist.barrier()
    ray.train.report({"step": result.final_step, "loss": result.final_loss or 0.0})
