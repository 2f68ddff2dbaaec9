"""The one loop inside a Ray Train worker: resume from Ray Train's checkpoint, report each new one.

Shared by the workers that train one model on a whole worker group (the apprentice, PromptNet):
the loop is :func:`dreamfleet.trainers.loop.run_loop` as in process; Ray Train persists the
checkpoints, so a restarted group resumes from the last one reported.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from dreamfleet.trainers.loop import Engine, LoopHooks, LoopResult, LoopSettings, Objective, run_loop
from dreamfleet.trainers.parallelize import DistContext

log = logging.getLogger("dreamfleet")


def _restore(ckpt_dir: Path) -> None:
    import ray.train

    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            shutil.copytree(d, ckpt_dir / f"step-{int(state['step']):08d}")


def run_on_ray(objective: Objective, settings: LoopSettings, engine: Engine, dist: DistContext, *, name: str,
               log_every: int = 50) -> LoopResult:
    """``run_loop`` with checkpoints restored from and reported to Ray Train (as ``<name>-stepN``)."""
    import ray.train

    def on_checkpoint(step: int, path: Path) -> None:
        from ray.train import Checkpoint

        ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(str(path)),
                         checkpoint_dir_name=f"{name}-step{step:08d}")

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if dist.is_main and step % log_every == 0:
            log.info("%s step %d/%d loss %.4f", name, step, settings.loop.steps, metrics["loss"])

    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-{name}-r{dist.rank}-"))
    try:
        ckpt_dir = work / "checkpoints"
        ckpt_dir.mkdir()
        _restore(ckpt_dir)
        return run_loop(objective, settings, checkpoint_dir=ckpt_dir, engine=engine, is_main=dist.is_main,
                        hooks=LoopHooks(on_step=on_step, on_checkpoint=on_checkpoint))
    finally:
        shutil.rmtree(work, ignore_errors=True)
