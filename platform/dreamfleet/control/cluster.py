"""The Ray side the control plane shares: connecting to a cluster (or starting an embedded
one), absolute URIs for other processes, and the ``TorchTrainer`` of a worker group that the
fan-out and the apprentice both launch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreamfleet.core.config import cfg
from dreamfleet.core.errors import ConfigError

NAMESPACE = "dreamfleet"


@dataclass(frozen=True)
class WorkerConfig:
    """The worker section the fan-out's and the apprentice's configs share: a worker's
    resources, the distributed engine, and the cluster to run on."""

    cpus_per_worker: float = cfg(1.0, "CPUs per worker")
    gpus_per_worker: float = cfg(0.0, "GPUs per worker (0: CPU training)")
    zero_stage: int = cfg(0, "0: plain DDP; 2 or 3: DeepSpeed ZeRO stage")
    offload: bool = cfg(False, "DeepSpeed: offload optimizer state to CPU memory")
    address: str | None = cfg(None, "Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")

    def check_workers(self) -> None:
        if self.zero_stage not in (0, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 2 or 3, got {self.zero_stage}")
        if self.offload and self.zero_stage == 0:
            raise ConfigError("--offload needs DeepSpeed: pass --zero-stage 2 or 3")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError("cpus_per_worker must be positive and gpus_per_worker not negative")


@dataclass(frozen=True)
class EncoderRuntime(WorkerConfig):
    """Where one model trained on a whole worker group trains (the apprentice, PromptNet):
    in this process, or as one Ray Train ``TorchTrainer`` of N data-parallel workers."""

    local: bool = cfg(False, "train in this process, without Ray")
    workers: int = cfg(1, "Ray Train workers (data parallel)")
    max_failures: int = cfg(2, "worker-group restarts (each resumes from the last checkpoint)")
    storage: str | None = cfg(None, "Ray Train storage for checkpoints (default: <out>.ray beside --out)")

    def __post_init__(self) -> None:
        self.check_workers()
        if self.workers < 1:
            raise ConfigError("workers must be at least 1")

    def storage_for(self, out: Path) -> str:
        return self.storage or str(out.parent / f".{out.name}.ray")


def connect_ray(address: str | None, *, num_cpus: int | None = None) -> bool:
    """Connect to a cluster, or start an embedded one. Returns True if this call started Ray."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env: dict | None = {"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        env = None  # a Ray Job's driver: the job's runtime env (set by `dreamfleet submit`) applies
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=False)
    else:
        # address="local": always a new embedded instance, never a stale `ray start` cluster
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, namespace=NAMESPACE,
                 runtime_env=env, log_to_driver=False, configure_logging=False)
    quiet_ray(os.environ.get("DREAMFLEET_VERBOSE") == "1")
    return True


def quiet_ray(verbose: bool) -> None:
    """Ray's own chatter off unless ``-v``: Ray Data's progress (logged every 10 s when the
    output is not a terminal) and Ray's INFO logs. The fan-out shows its own progress."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    for name, quiet in (("ray", logging.WARNING), ("ray.data", logging.ERROR), ("ray.train", logging.WARNING)):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else quiet)


def absolute(uri: str) -> str:
    """Workers run in other processes and on other nodes: never hand them a relative path."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def worker_group(fn: Callable[[dict[str, Any]], None], config: dict[str, Any], *, name: str, workers: int,
                 cpus_per_worker: float, gpus_per_worker: float, storage: str, max_failures: int):
    """A Ray Train ``TorchTrainer`` (``WorkerGroupTrainer``: less two fixed costs per ``fit()``)
    of ``workers`` workers running ``fn(config)``, checkpoints persisted under ``storage`` (two
    kept), restarted up to ``max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from dreamfleet.control.trainer import WorkerGroupTrainer
    from dreamfleet.core.storage import ray_storage

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    storage_path, storage_fs = ray_storage(absolute(storage))
    return WorkerGroupTrainer(
        fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
