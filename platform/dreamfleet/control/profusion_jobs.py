"""The one-photo ProFusion flow behind ``POST /v1/profusion/jobs``.

The ingress checks the request and hands it to :class:`ProFusionJobs`, one Serve deployment
that bounds the customisations running at once (more answer 429) and launches each as a Ray
task (:func:`customize_task`, 1 CPU or GPU): the photo becomes a ``profusion`` expert published
to the registry. The job's state lives in the registry (the subject's ``state.json``: queued,
training, done or failed, with the version or the error), so any ingress replica answers
``GET /v1/profusion/jobs/{id}`` and the dashboard lists the jobs with the other subjects.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dreamfleet.serving.config import PROFUSION_JOB_RUN_ID as JOB_RUN_ID

log = logging.getLogger("dreamfleet")


def customize_task(registry_uri: str, base_model: str, job: dict[str, Any], train: dict[str, Any]) -> str:
    """Customise ``job["subject"]`` from its photo, publish the expert, record the outcome."""
    from dreamfleet.core.config import from_dict
    from dreamfleet.core.images import decode_image
    from dreamfleet.registry import Registry
    from dreamfleet.trainers.config import TrainConfig
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    registry, sid = Registry(registry_uri), job["subject"]
    registry.update_state(sid, state="training", error=None)
    work = Path(tempfile.mkdtemp(prefix=f"dreamfleet-profusion-{sid}-"))
    try:
        photo = decode_image(job["photo"], name=f"{sid}: photo")
        subject = SubjectData(sid, job["class_noun"], [photo], tenant=job.get("tenant"), source="http")
        def on_step(step: int, metrics: dict[str, float]) -> None:
            if step % 10 == 0:
                registry.update_state(sid, step=step, loss=metrics.get("loss"))

        result = train_subject(subject, base_model, from_dict(TrainConfig, train), work / "expert", progress=False,
                               on_step=on_step)
        version = registry.publish(sid, result.expert_dir)
        registry.update_state(sid, state="done", version=version, step=result.loop.final_step)
        return version
    except Exception as e:
        log.exception("ProFusion job %s failed", sid)
        registry.update_state(sid, state="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def job_train_config(cfg) -> dict[str, Any]:
    """The TrainConfig of an HTTP customisation, from the serving config."""
    return {"method": "profusion", "promptnet": cfg.promptnet, "steps": cfg.profusion_steps,
            "views": cfg.profusion_views, "batch_size": cfg.profusion_batch_size, "checkpoint_every": 0,
            "validation_every": 0}


class ProFusionJobs:
    """Launches customisations as Ray tasks, at most ``max_profusion_jobs`` at once (a Serve
    deployment with one replica: the bound is the cluster's)."""

    def __init__(self, cfg_dict: dict[str, Any], base_model: str):
        import ray

        from dreamfleet.core.config import from_dict
        from dreamfleet.registry import Registry
        from dreamfleet.serving.config import ServeConfig

        self.cfg = from_dict(ServeConfig, cfg_dict)
        self.registry = Registry(self.cfg.registry, create=False)
        self.base_model = base_model
        self.train = job_train_config(self.cfg)
        resources = {"num_gpus": 1} if self.cfg.gpus_per_replica else {"num_cpus": 1}
        self.task = ray.remote(**resources, max_retries=0)(customize_task)
        self.running: dict[str, Any] = {}

    def _prune(self) -> None:
        import ray

        if self.running:
            done, _ = ray.wait(list(self.running.values()), num_returns=len(self.running), timeout=0)
            self.running = {k: v for k, v in self.running.items() if v not in done}

    async def submit(self, job: dict[str, Any]) -> dict[str, Any]:
        """Start ``job`` (subject, class_noun, photo bytes, tenant) or say why not."""
        self._prune()
        if len(self.running) >= self.cfg.max_profusion_jobs:
            return {"error": "too_many", "running": len(self.running)}
        sid = job["subject"]
        self.registry.update_state(sid, state="queued", run_id=JOB_RUN_ID, tenant=job.get("tenant"),
                                   class_noun=job["class_noun"], total_steps=self.cfg.profusion_steps, error=None)
        self.running[sid] = self.task.remote(self.cfg.registry, self.base_model, job, self.train)
        return {"job_id": sid, "running": len(self.running)}


def jobs_deployment(cfg):
    """The bound ``ProFusionJobs`` deployment for ``build_app``, or None without a PromptNet."""
    if not cfg.promptnet:
        return None
    from ray import serve

    from dreamfleet.core.config import to_dict
    from dreamfleet.core.profusion import PromptNetInfo

    base = PromptNetInfo.read(cfg.promptnet).base_model["spec"]
    deployment = serve.deployment(ray_actor_options={"num_cpus": 0}, num_replicas=1)(ProFusionJobs)
    return deployment.bind(to_dict(cfg), base)
