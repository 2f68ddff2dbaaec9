"""The one fit-and-publish path: prepared subjects -> the loop -> expert folders.

:func:`fit` trains one prepared subject (LoRA or full weights, on one process, DDP or
DeepSpeed ZeRO) or several packed LoRA subjects (:mod:`dreamfleet.trainers.packing`) with the
one loop, and publishes each subject's expert folder. ``train_subject`` and ``train_packed``
(in this process) and the fan-out's solo and packed paths (:mod:`dreamfleet.trainers.runtime`)
all call it; they differ only in where checkpoints live and which hooks report progress.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import EXPERT_FILE
from dreamfleet.core.models import BaseModel, load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.dreambooth import (
    DreamBoothObjective,
    PreparedSubject,
    SubjectData,
    TrainResult,
    free_text_encoders,
    loop_settings,
    prepare_subject,
    publish_expert,
    save_validation_grid,
    setup_trainable,
    work_dir_for,
)
from dreamfleet.trainers.loop import Engine, LoopHooks, LoopSettings, Objective, run_loop
from dreamfleet.trainers.packing import (
    PackedEngine,
    pack_work_dir,
    packed_loop_settings,
    packed_objective,
    save_packed_validation,
    setup_packed,
    subject_result,
)
from dreamfleet.trainers.parallelize import DeepSpeedEngine, DistContext, build_engine
from dreamfleet.trainers.select import Selector, selector_for
from dreamfleet.trainers.tracking import tracking_hooks


@dataclass
class FitOptions:
    """Where and how :func:`fit` trains; the defaults are one local process."""

    checkpoint_dir: Path | None = None
    dist: DistContext = field(default_factory=DistContext)
    zero_stage: int = 0
    offload: bool = False
    progress: bool = True
    allow_config_change: bool = False
    overwrite: bool = True
    packed: bool | None = None  # None: packed when there are several subjects


@dataclass
class _Setup:
    objective: Objective
    settings: LoopSettings
    engine: Engine
    on_validation: Callable[[int], None]
    config: dict[str, Any]
    packed: Any = None  # the PackedLoRA of a packed run
    selector: Selector | None = None  # best-step selection of a solo run


def prepare_any(subject: SubjectData, base: BaseModel | str, cfg: TrainConfig, *,
                class_cache: ClassImageCache | None = None):
    """The subject prepared for :func:`fit`: DreamBooth, or ProFusion's customisation (method=profusion)."""
    if cfg.method == "profusion":
        from dreamfleet.trainers.profusion import prepare_from_train

        return prepare_from_train(subject, load_base(base) if isinstance(base, str) else base, cfg)
    return prepare_subject(subject, base, cfg, class_cache=class_cache)


def _is_profusion(p: Any) -> bool:
    return p.cfg.method == "profusion"


def _setup_profusion(p: Any, o: FitOptions) -> _Setup:
    from dreamfleet.trainers.profusion import loop_settings as profusion_settings
    from dreamfleet.trainers.profusion import objective_for_fit

    objective = objective_for_fit(p, o.dist, o.zero_stage, o.offload)
    settings = profusion_settings(p, "profusion", progress=o.progress and o.dist.is_main)
    return _Setup(objective, settings, build_engine(objective, settings, o.dist, 0, False), lambda step: None,
                  to_dict(p.cfg))


def _publish(p: Any, r, out: Path, work: Path, *, wall: float, opts: FitOptions, unet_state, unet_lora, stats,
             selection: dict | None = None):
    if _is_profusion(p):
        from dreamfleet.trainers.profusion import publish_profusion_expert

        return publish_profusion_expert(p, p.pinfo, p.subject, r, out, wall_time_s=wall, overwrite=opts.overwrite,
                                        extra_stats=stats)
    return publish_expert(p, r, out, work, wall_time_s=wall, overwrite=opts.overwrite, unet_state=unet_state,
                          unet_lora=unet_lora, extra_stats=stats, selection=selection)


def _setup_solo(p: PreparedSubject, work: Path, o: FitOptions) -> _Setup:
    if _is_profusion(p):
        return _setup_profusion(p, o)
    setup_trainable(p)
    objective = DreamBoothObjective.from_prepared(p, rank=o.dist.rank)
    free_text_encoders(p)
    settings = loop_settings(p, progress=o.progress and o.dist.is_main)
    engine = build_engine(objective, settings, o.dist, o.zero_stage, o.offload)
    write = o.dist.is_main  # every rank renders (ZeRO-3 forwards are collective); rank 0 writes
    selector = selector_for(p, objective, engine, world_size=o.dist.world_size, zero_stage=o.zero_stage)
    return _Setup(objective, settings, engine, lambda step: save_validation_grid(p, work, step, write=write),
                  to_dict(p.cfg), selector=selector)


def _setup_packed(prepared: Sequence[PreparedSubject], works: Sequence[Path], o: FitOptions) -> _Setup:
    if o.dist.world_size > 1 or o.zero_stage or o.offload:
        raise ConfigError("a packed run trains on one process without DeepSpeed: pack with --workers-per-subject 1 "
                          "and no --zero-stage or --offload")
    if bucketed := [p.subject.subject_id for p in prepared if p.cfg.aspect_buckets]:
        raise ConfigError(f"subjects {', '.join(bucketed)}: a packed run stacks its subjects' batches, which aspect "
                          "buckets give different sizes; train them with --pack 1")
    if selecting := [p.subject.subject_id for p in prepared if p.cfg.select_every]:
        raise ConfigError(f"subjects {', '.join(selecting)}: select_every stops each subject at its own step, and a "
                          "packed run trains its subjects in lockstep; train them with --pack 1")
    packed = setup_packed(prepared)
    objective = packed_objective(prepared, packed)
    free_text_encoders(prepared[0])
    settings = packed_loop_settings(prepared, progress=o.progress)
    return _Setup(objective, settings, PackedEngine(objective, settings),
                  lambda step: save_packed_validation(packed, prepared, works, step),
                  {p.subject.subject_id: to_dict(p.cfg) for p in prepared}, packed)


def fit(
    prepared: Sequence[PreparedSubject],
    works: Sequence[Path],
    out_dirs: Sequence[Path],
    opts: FitOptions,
    *,
    hooks: LoopHooks | None = None,
    extra_stats: Callable[[int], dict] | None = None,
    started: float | None = None,
) -> list[TrainResult]:
    """Train ``prepared`` (one subject, or several packed) and publish subject i's expert at
    ``out_dirs[i]``, its validation grids from ``works[i]/validation``. ``hooks.on_validation``
    is this function's; ``extra_stats(i)`` adds to subject i's ``train_stats`` at publish time.
    Returns the published experts (none on ranks other than 0)."""
    started = time.perf_counter() if started is None else started
    for work in works:
        (work / "validation").mkdir(parents=True, exist_ok=True)
    packed = len(prepared) > 1 if opts.packed is None else opts.packed
    s = _setup_packed(prepared, works, opts) if packed else _setup_solo(prepared[0], works[0], opts)
    hooks, close_tracking = tracking_hooks(prepared, hooks or LoopHooks(), packed=packed, is_main=opts.dist.is_main)
    hooks = replace(hooks, on_validation=s.on_validation)
    try:
        result = run_loop(s.objective, s.settings, checkpoint_dir=opts.checkpoint_dir,
                          hooks=s.selector.hooks(hooks) if s.selector else hooks, engine=s.engine,
                          is_main=opts.dist.is_main, config=s.config, allow_config_change=opts.allow_config_change)
    except BaseException:
        close_tracking(failed=True)
        raise
    close_tracking()
    selection = s.selector.finish(result.final_step) if s.selector else None
    unet_state = s.engine.full_unet_state() if isinstance(s.engine, DeepSpeedEngine) else None
    if not opts.dist.is_main:
        return []
    wall = time.perf_counter() - started
    ids = [p.subject.subject_id for p in prepared]
    published = []
    for i, (p, out, work) in enumerate(zip(prepared, out_dirs, works, strict=True)):
        r = subject_result(result, ids[i]) if s.packed is not None else result
        stats = {**(extra_stats(i) if extra_stats else {}),
                 **({"packed": {"subjects": ids, "index": i}} if s.packed is not None else {})}
        info = _publish(p, r, out, work, wall=wall, opts=opts, unet_state=unet_state,
                        unet_lora=s.packed.adapter(i) if s.packed is not None else None, stats=stats,
                        selection=selection)
        published.append(TrainResult(expert_dir=out, info=info, loop=r))
    return published


# --------------------------------------------------------------------------- in this process


def _refuse_overwrite(out_dirs: Sequence[Path], overwrite: bool) -> None:
    for out in out_dirs:
        if (out / EXPERT_FILE).is_file() and not overwrite:
            raise ConfigError(f"{out} already holds an expert; pass --overwrite to replace it, or choose another --out")


def train_subject(
    subject: SubjectData,
    base: BaseModel | str,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    class_cache: ClassImageCache | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train one subject end to end and publish its expert folder at ``out_dir``.

    Interrupted runs resume from the newest checkpoint in the work folder beside ``out_dir``
    when called again with the same arguments; with another config they are refused
    (``ConfigError`` naming the fields) unless ``allow_config_change``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _refuse_overwrite([out_dir], overwrite)
    p = prepare_any(subject, base, cfg, class_cache=class_cache)
    work = work_dir_for(out_dir)
    opts = FitOptions(checkpoint_dir=work / "checkpoints", progress=progress,
                      allow_config_change=allow_config_change, overwrite=overwrite)
    (result,) = fit([p], [work], [out_dir], opts, hooks=LoopHooks(on_step=on_step), started=t0)
    shutil.rmtree(work, ignore_errors=True)
    return result


def train_packed(
    subjects: Sequence[SubjectData],
    base: BaseModel | str,
    cfg: TrainConfig | Sequence[TrainConfig],
    out_dirs: Sequence[str | Path],
    *,
    class_cache: ClassImageCache | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    allow_config_change: bool = False,
) -> list[TrainResult]:
    """Train several subjects' LoRA experts in one packed run; publish each at its ``out_dirs`` entry.

    ``cfg`` is one config for all subjects or one per subject (differing only in ``seed``).
    Each expert is what :func:`train_subject` would publish for its subject, up to float
    summation order; an interrupted run resumes from the newest checkpoint of the pack when
    called again with the same arguments.
    """
    t0 = time.perf_counter()
    out_dirs = [Path(o) for o in out_dirs]
    cfgs = [cfg] * len(subjects) if isinstance(cfg, TrainConfig) else list(cfg)
    if not (len(subjects) == len(cfgs) == len(out_dirs)):
        raise ConfigError(f"{len(subjects)} subjects, {len(cfgs)} configs and {len(out_dirs)} output folders: "
                          "give one of each per subject")
    _refuse_overwrite(out_dirs, overwrite)
    base = load_base(base) if isinstance(base, str) else base
    # Class images come from the plain base model: prepare every subject before packing.
    prepared = [prepare_subject(s, base, c, class_cache=class_cache) for s, c in zip(subjects, cfgs, strict=True)]
    works = [work_dir_for(out) for out in out_dirs]
    pack_work = pack_work_dir(out_dirs)
    opts = FitOptions(checkpoint_dir=pack_work / "checkpoints", progress=progress,
                      allow_config_change=allow_config_change, overwrite=overwrite, packed=True)
    results = fit(prepared, works, out_dirs, opts, hooks=LoopHooks(on_step=on_step), started=t0)
    for work in [*works, pack_work]:
        shutil.rmtree(work, ignore_errors=True)
    return results
