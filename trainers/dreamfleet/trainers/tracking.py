"""Experiment tracking of training: TensorBoard event files, MLflow and W&B runs, one per subject.

Each is a loop hook around the runtime's own (:func:`tracking_hooks`), on rank 0 only, each
turned on by its config field: ``tensorboard_dir`` (scalars ``train/loss``, ``train/lr``,
``train/grad_norm``, ..., and best-step selection's ``eval/subject``, ``eval/prompt``,
``eval/prompt_ratio``), ``mlflow_tracking_uri`` (an MLflow run per subject in the
experiment ``mlflow_experiment``: the resolved config as parameters, the same metrics per
step) and ``wandb_project`` (a Weights & Biases run per subject, as the user's wandb is
configured: a login, ``WANDB_ENTITY``, ``WANDB_MODE=offline``). Ray Train leaves per-worker
tracking to the training function, which is this.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError
from dreamfleet.trainers.loop import LoopHooks

MLFLOW_FLUSH_STEPS = 20  # metrics go to MLflow in batches of this many steps (one request each)


def subject_metrics(metrics: dict[str, float], sid: str, packed: bool) -> dict[str, float]:
    """One subject's metrics of a step: a packed run's are ``<subject>/loss``, its lr shared."""
    own = {k.removeprefix(f"{sid}/"): v for k, v in metrics.items() if packed and k.startswith(f"{sid}/")}
    shared = {k: v for k, v in metrics.items() if "/" not in k and k not in own}
    return {**shared, **own}


def metric_tag(key: str) -> str:
    """``eval_subject`` -> ``eval/subject``; ``loss`` -> ``train/loss``."""
    return f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"


class TensorBoardRun:
    """One subject's TensorBoard event files, under its config's ``tensorboard_dir``/<subject>/."""

    def __init__(self, p: Any):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(f"{p.cfg.tensorboard_dir.rstrip('/')}/{p.subject.subject_id}")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(metric_tag(key), value, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class MlflowRun:
    """One subject's MLflow run: its resolved config as parameters, metrics batched per
    :data:`MLFLOW_FLUSH_STEPS` steps, marked finished (or failed) at the end."""

    def __init__(self, p: Any):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError("mlflow_tracking_uri needs the MLflow client: pip install 'dreamfleet[mlflow]' "
                              "(mlflow-skinny), or drop --mlflow-tracking-uri") from e
        cfg, sid = p.cfg, p.subject.subject_id
        if "://" not in cfg.mlflow_tracking_uri or cfg.mlflow_tracking_uri.startswith("file:"):
            # a folder: MLflow 3 keeps its file store in maintenance mode behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)
        exp = self.client.get_experiment_by_name(cfg.mlflow_experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.mlflow_experiment)
        self.run_id = self.client.create_run(exp_id, run_name=sid, tags={
            "dreamfleet.subject": sid, "dreamfleet.class_noun": p.subject.class_noun,
            "dreamfleet.base_model": str(p.base.describe.get("spec", ""))}).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in sorted(to_dict(cfg).items()) if v is not None]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.pending: list[Any] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(metric_tag(k), float(v), now, step) for k, v in metrics.items()]
        if step % MLFLOW_FLUSH_STEPS == 0:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=self.pending[i:i + 1000])
        self.pending = []

    def close(self, failed: bool = False) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class WandbRun:
    """One subject's W&B run (several may be open at once: a packed run's subjects)."""

    def __init__(self, p: Any):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError("wandb_project needs Weights & Biases: pip install 'dreamfleet[wandb]', or drop "
                              "--wandb-project") from e
        sid = p.subject.subject_id
        self.run = wandb.init(project=p.cfg.wandb_project, name=sid, config=to_dict(p.cfg), reinit="create_new",
                              tags=[p.subject.class_noun], job_type="dreambooth")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({metric_tag(k): float(v) for k, v in metrics.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def run_hooks(factory: Callable[[Any], Any], field: str, prepared: Sequence[Any], hooks: LoopHooks, *, packed: bool,
              is_main: bool) -> tuple[LoopHooks, Callable[..., None]]:
    """``hooks`` with each subject's step metrics also logged to its run (``factory(p)``: a
    :class:`TensorBoardRun`, :class:`MlflowRun` or :class:`WandbRun`) where its config sets
    ``field`` (rank 0 only), and the function that ends the runs."""
    wanted = [p for p in prepared if getattr(p.cfg, field, None)]
    if not wanted or not is_main:
        return hooks, lambda failed=False: None
    runs = {p.subject.subject_id: factory(p) for p in wanted}
    inner = hooks.on_step

    def on_step(step: int, metrics: dict[str, float]) -> None:
        if inner is not None:
            inner(step, metrics)
        for sid, run in runs.items():
            run.log(step, subject_metrics(metrics, sid, packed))

    def close(failed: bool = False) -> None:
        for run in runs.values():
            run.close(failed)

    return replace(hooks, on_step=on_step), close


def tracking_hooks(prepared: Sequence[Any], hooks: LoopHooks, *, packed: bool,
                   is_main: bool) -> tuple[LoopHooks, Callable[..., None]]:
    """``hooks`` with TensorBoard, MLflow and W&B tracking where the configs ask for them, and
    the function that closes them all (``close(failed=True)`` when training raised)."""
    hooks, close_tb = run_hooks(TensorBoardRun, "tensorboard_dir", prepared, hooks, packed=packed, is_main=is_main)
    hooks, close_mlflow = run_hooks(MlflowRun, "mlflow_tracking_uri", prepared, hooks, packed=packed, is_main=is_main)
    hooks, close_wandb = run_hooks(WandbRun, "wandb_project", prepared, hooks, packed=packed, is_main=is_main)

    def close(failed: bool = False) -> None:
        try:
            close_wandb(failed)
            close_mlflow(failed)
        finally:
            close_tb(failed)

    return hooks, close
