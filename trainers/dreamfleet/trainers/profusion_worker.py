"""Ray Train's ``train_loop_per_worker`` for PromptNet pre-training: the same loop as in
process, under DDP or DeepSpeed ZeRO (``parallelize``), checkpoints reported to Ray Train."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamfleet.core.config import from_dict
from dreamfleet.trainers.parallelize import DeepSpeedEngine, DistContext, build_engine
from dreamfleet.trainers.ray_loop import run_on_ray


@dataclass
class PromptNetRunConfig:
    manifest: str
    base_model: str
    out: str
    train_config: dict[str, Any]
    subjects: list[str] | None = None
    zero_stage: int = 0
    offload: bool = False


def promptnet_worker(config: dict[str, Any]) -> None:
    """Every rank draws its own batches (stream = rank); rank 0 publishes the PromptNet folder."""
    import ray.train

    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.profusion import (
        ProFusionObjective,
        PromptNetConfig,
        choose_placeholder,
        loop_settings,
        manifest_photos,
        prepare,
        publish_promptnet,
    )

    rc = PromptNetRunConfig(**config)
    t0 = time.perf_counter()
    ctx = ray.train.get_context()
    dist = DistContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    c = from_dict(PromptNetConfig, rc.train_config)
    base = load_base(rc.base_model)
    photos, nouns, dataset = manifest_photos(rc.manifest, rc.subjects)
    p = prepare(base, c, None, choose_placeholder(base, c), photos, nouns, c.reference)
    objective = ProFusionObjective(p, rank=dist.rank)
    settings = loop_settings(p, "promptnet", progress=False)
    engine = build_engine(objective, settings, dist, rc.zero_stage, rc.offload)
    result = run_on_ray(objective, settings, engine, dist, name="promptnet")
    full = engine.full_unet_state() if isinstance(engine, DeepSpeedEngine) else None
    if dist.is_main:
        publish_promptnet(p, result, Path(rc.out), dataset=dataset, wall_time_s=time.perf_counter() - t0,
                          overwrite=True, full_state=full,
                          extra_stats={"world_size": dist.world_size, "zero_stage": rc.zero_stage})
    dist.barrier()
    ray.train.report({"step": result.final_step, "loss": result.final_loss or 0.0})
