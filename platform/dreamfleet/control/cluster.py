"""The Ray side the control plane shares: connecting to a cluster (or starting an embedded
one), absolute URIs for other processes, and the ``TorchTrainer`` of a worker group that the
fan-out and the apprentice both launch."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAMESPACE = "dreamfleet"


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
    return True


def absolute(uri: str) -> str:
    """Workers run in other processes and on other nodes: never hand them a relative path."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def worker_group(fn: Callable[[dict[str, Any]], None], config: dict[str, Any], *, name: str, workers: int,
                 cpus_per_worker: float, gpus_per_worker: float, storage: str, max_failures: int):
    """A Ray Train ``TorchTrainer`` of ``workers`` workers running ``fn(config)``, checkpoints
    persisted under ``storage`` (two kept), restarted up to ``max_failures`` times."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    return TorchTrainer(
        fn,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=absolute(storage),
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
