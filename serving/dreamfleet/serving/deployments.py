"""The model deployments: ``ExpertModel`` (multiplexed experts over one base pipeline per
replica, mixed-subject batching through its own queue) and ``ApprenticeModel`` (zero-shot, from demonstrations).

Both are defined once, here. What depends on the server's config is wired per replica in
``__init__`` (the multiplexing LRU's size, the batch size and wait) or at bind time in
:func:`dreamfleet.serving.app.build_app` (``num_replicas``, CPUs and GPUs per replica).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import uuid
from typing import Any

from ray import serve

from dreamfleet.core.config import from_dict
from dreamfleet.core.expert import ExpertKey
from dreamfleet.serving.batcher import Batcher
from dreamfleet.serving.config import ServeConfig

log = logging.getLogger("dreamfleet.serving")


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def replica_setup(cfg_dict: dict[str, Any]) -> tuple[ServeConfig, str]:
    """A model replica's config and id. Ray starts actors with OMP_NUM_THREADS=1 (or their CPU
    reservation): torch gets the CPUs this replica may use, else CPU generation runs on one core."""
    import torch

    c = from_dict(ServeConfig, cfg_dict)
    torch.set_num_threads(max(1, int(c.cpus_per_replica) or os.cpu_count() or 1))
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside a replica (a direct call in a test)
        replica = uuid.uuid4().hex[:8]
    return c, replica


class _Loaded:
    """What the multiplexing LRU holds; eviction unloads the expert from the device."""

    def __init__(self, engine, subject_id: str, version: str):
        self.engine, self.subject_id, self.version = engine, subject_id, version
        self._evicted = False

    def __del__(self) -> None:
        if not self._evicted:
            self._evicted = True
            self.engine.evict(self.subject_id, self.version)


@serve.deployment  # max_ongoing_requests and max_queued_requests: set in build_app from the config
class ExpertModel:
    def __init__(self, cfg_dict: dict[str, Any]):
        from dreamfleet.serving.engine import ExpertEngine

        self.cfg, self.replica = replica_setup(cfg_dict)
        self.engine = engine = ExpertEngine(self.cfg.registry, host_cache_size=self.cfg.host_cache_size,
                                            max_active=self.cfg.max_models_per_replica)

        async def load(model_id: str) -> _Loaded:
            # Only the multiplexing LRU's entry: the engine loads the weights in the batch's pass
            # (under its lock, with the batch's other experts), so a load never waits for a pass
            # to end and requests for different experts still arrive together and share a pass.
            return _Loaded(engine, *ExpertKey.parse(model_id))

        # The LRU's size comes from the config, so multiplexing is wired here, per replica. `load`
        # is a plain function, not a bound method: Ray keeps the LRU as an attribute of the function.
        # It only routes (a replica that holds an expert in memory gets its requests): the engine
        # bounds what is on the device. Sized as the host cache, so 20 rotating LoRA experts do
        # not churn it (each churn costs a Ray routing retry and an unload on the event loop).
        lru = max(self.cfg.max_models_per_replica, self.cfg.host_cache_size)
        self.get_model = serve.multiplexed(max_num_models_per_replica=lru)(load)
        self.batcher = Batcher(engine.generate_jobs, max_size=self.cfg.max_batch_size, wait_s=self.cfg.batch_wait_s)

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        """One request's images. ``item["deadline"]``: ``time.time()`` seconds it must finish by.
        Requests that arrive together, for any experts, go to the engine in one call (it renders
        plain LoRA experts of one base model in one pass). A request cancelled by its caller (the
        client went away, or the ingress's deadline hit) stops its pass between denoising steps,
        once every request in the pass is dead."""
        from dreamfleet.serving.engine import GenItem, Job, Ticket

        model_id = serve.get_multiplexed_model_id()
        key = ExpertKey.parse(model_id)
        cache = "hit" if key in self.engine.active else ("host" if key in self.engine.host else "disk")
        ticket = Ticket(deadline=item.pop("deadline", None))
        try:
            await self.get_model(model_id)
            images = await self.batcher.submit(Job(key.subject_id, key.version, GenItem(**item), ticket))
            images = [_png_b64(im) for im in images]
        except asyncio.CancelledError:
            ticket.cancelled.set()
            raise
        except Exception as e:  # reported to the ingress, which answers with its status
            images = e
        return {"images": images, "cache": cache, "replica": self.replica,
                "stats": self.engine.stats.as_dict(), "loaded": self.engine.loaded()}

    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "stats": self.engine.stats.as_dict(), "loaded": self.engine.loaded()}


@serve.deployment(max_ongoing_requests=64)
class ApprenticeModel:
    """The zero-shot apprentice: requests with demonstrations instead of a subject."""

    def __init__(self, cfg_dict: dict[str, Any]):
        from dreamfleet.serving.apprentice import ApprenticeEngine

        self.cfg, self.replica = replica_setup(cfg_dict)
        self.engine = ApprenticeEngine(self.cfg.apprentice)

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        from dreamfleet.serving.apprentice import png_bytes

        demos = item.pop("demonstrations")
        images = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.engine.generate(demos, **item))
        return {"images": [base64.b64encode(png_bytes(im)).decode() for im in images], "cache": "apprentice",
                "replica": self.replica, "stats": self.engine.stats.as_dict(), "loaded": ["apprentice"]}
