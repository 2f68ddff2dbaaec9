"""The model deployments: ``ExpertModel`` (multiplexed experts over one base pipeline per
replica, same-expert batching) and ``ApprenticeModel`` (zero-shot, from demonstrations).

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


@serve.deployment(max_ongoing_requests=64)
class ExpertModel:
    def __init__(self, cfg_dict: dict[str, Any]):
        from dreamfleet.serving.engine import ExpertEngine

        self.cfg, self.replica = replica_setup(cfg_dict)
        self.engine = engine = ExpertEngine(self.cfg.registry, host_cache_size=self.cfg.host_cache_size)

        async def load(model_id: str) -> _Loaded:
            key = ExpertKey.parse(model_id)
            await asyncio.get_running_loop().run_in_executor(None, engine.load, *key)
            return _Loaded(engine, *key)

        # The LRU's size comes from the config, so multiplexing is wired here, per replica. `load`
        # is a plain function, not a bound method: Ray keeps the LRU as an attribute of the function.
        self.get_model = serve.multiplexed(max_num_models_per_replica=self.cfg.max_models_per_replica)(load)
        # The batch queue is made on the first call, with the values set by then.
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_s)

    async def generate(self, item: dict[str, Any]) -> dict[str, Any]:
        model_id = serve.get_multiplexed_model_id()
        key = ExpertKey.parse(model_id)
        cache = "hit" if key in self.engine.active else ("host" if key in self.engine.host else "disk")
        await self.get_model(model_id)
        images = await self._batched({**item, "model_id": model_id})
        return {"images": images, "cache": cache, "replica": self.replica,
                "stats": self.engine.stats.as_dict(), "loaded": self.engine.loaded()}

    @serve.batch  # max_batch_size and batch_wait_timeout_s: set in __init__ from the config
    async def _batched(self, items: list[dict[str, Any]]) -> list[Any]:
        from dreamfleet.serving.engine import GenItem

        results: list[Any] = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            by_model.setdefault(it["model_id"], []).append(i)
        loop = asyncio.get_running_loop()
        for model_id, idx in by_model.items():
            key = ExpertKey.parse(model_id)
            gen_items = [GenItem(**{k: v for k, v in items[i].items() if k != "model_id"}) for i in idx]
            try:
                images = await loop.run_in_executor(None, self.engine.generate, *key, gen_items)
                for i, imgs in zip(idx, images, strict=True):
                    results[i] = [_png_b64(im) for im in imgs]
            except Exception as e:  # one expert's failure does not fail the others in the batch
                log.exception("generation failed for %s", model_id)
                for i in idx:
                    results[i] = e
        return results

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
