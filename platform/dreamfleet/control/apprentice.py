"""`dreamfleet apprentice train`: the apprentice on Ray Train (DDP or DeepSpeed ZeRO), or in process.

The same :class:`~dreamfleet.trainers.apprentice.ApprenticeObjective` and training loop as
``--local``; on Ray it runs as one ``TorchTrainer`` of N workers with checkpoints persisted
to ``--storage`` (default: beside the output), so a failed worker group restarts from the
last checkpoint (``FailureConfig``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path

from dreamfleet.control.cluster import EncoderRuntime
from dreamfleet.core.apprentice import ApprenticeInfo
from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError

log = logging.getLogger("dreamfleet")


# Where the apprentice trains (the section PromptNet pre-training shares).
ApprenticeRuntime = EncoderRuntime


def train(demo_set: str | Path, base_model: str, train_config, out: str | Path, rt: ApprenticeRuntime | None = None,
          *, overwrite: bool = False) -> ApprenticeInfo:
    from dreamfleet.control.cluster import absolute, connect_ray, worker_group
    from dreamfleet.core.apprentice import APPRENTICE_FILE

    rt = rt or ApprenticeRuntime()
    out = Path(absolute(str(out)))
    if (out / APPRENTICE_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out} already holds an apprentice; pass --overwrite or choose another --out")
    if rt.local:
        from dreamfleet.trainers.apprentice import train_apprentice

        return train_apprentice(demo_set, base_model, train_config, out, overwrite=overwrite)

    from dreamfleet.trainers.apprentice_worker import ApprenticeRunConfig, apprentice_worker

    connect_ray(rt.address)
    rc = ApprenticeRunConfig(demo_set=absolute(str(demo_set)), base_model=base_model, out=str(out),
                             train_config=to_dict(train_config), zero_stage=rt.zero_stage, offload=rt.offload)
    t0 = time.perf_counter()
    trainer = worker_group(apprentice_worker, dataclasses.asdict(rc), name=f"apprentice-{uuid.uuid4().hex[:6]}",
                           workers=rt.workers, cpus_per_worker=rt.cpus_per_worker, gpus_per_worker=rt.gpus_per_worker,
                           storage=rt.storage_for(out), max_failures=rt.max_failures)
    trainer.fit()
    info = ApprenticeInfo.read(out)
    log.info("apprentice trained on Ray in %.0f s (%d worker(s)): %s", time.perf_counter() - t0, rt.workers, out)
    return info
