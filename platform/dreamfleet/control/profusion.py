"""`dreamfleet profusion pretrain`: PromptNet on Ray Train (DDP or DeepSpeed ZeRO), or in process.

The same :class:`~dreamfleet.trainers.profusion.ProFusionObjective` and loop as ``--local``; on
Ray it runs as one ``TorchTrainer`` of N workers with checkpoints persisted to ``--storage``
(default: beside the output), so a failed worker group resumes from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from pathlib import Path

from dreamfleet.control.cluster import EncoderRuntime
from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import ConfigError
from dreamfleet.core.profusion import PROMPTNET_FILE, PromptNetInfo

log = logging.getLogger("dreamfleet")


def pretrain(manifest: str | Path, base_model: str, train_config, out: str | Path, rt: EncoderRuntime | None = None,
             *, subjects: list[str] | None = None, overwrite: bool = False) -> PromptNetInfo:
    from dreamfleet.control.cluster import absolute, connect_ray, worker_group

    rt = rt or EncoderRuntime()
    out = Path(absolute(str(out)))
    if (out / PROMPTNET_FILE).is_file() and not overwrite:
        raise ConfigError(f"{out} already holds a PromptNet; pass --overwrite or choose another --out")
    if rt.local:
        from dreamfleet.trainers.profusion import pretrain_promptnet

        return pretrain_promptnet(manifest, base_model, train_config, out, subjects=subjects, overwrite=overwrite)

    from dreamfleet.trainers.profusion_worker import PromptNetRunConfig, promptnet_worker

    connect_ray(rt.address)
    rc = PromptNetRunConfig(manifest=absolute(str(manifest)), base_model=base_model, out=str(out),
                            train_config=to_dict(train_config), subjects=subjects, zero_stage=rt.zero_stage,
                            offload=rt.offload)
    t0 = time.perf_counter()
    trainer = worker_group(promptnet_worker, dataclasses.asdict(rc), name=f"promptnet-{uuid.uuid4().hex[:6]}",
                           workers=rt.workers, cpus_per_worker=rt.cpus_per_worker, gpus_per_worker=rt.gpus_per_worker,
                           storage=rt.storage_for(out), max_failures=rt.max_failures)
    trainer.fit()
    info = PromptNetInfo.read(out)
    log.info("PromptNet pre-trained on Ray in %.0f s (%d worker(s)): %s", time.perf_counter() - t0, rt.workers, out)
    return info
