"""The Ray Serve application: a FastAPI ingress and a multiplexed expert-model deployment.

Routes: ``POST /v1/generate`` (with ``subject``: its expert; with ``demonstrations``: the
zero-shot apprentice deployment, when the server has one), ``POST /v1/images/generations`` (OpenAI-compatible),
``GET /v1/subjects``, ``GET /v1/subjects/{id}/sample.png``, ``GET /healthz``, ``GET /metrics``
(Prometheus text format).

A request for subject S goes to the ``ExpertModel`` deployment with multiplexed model id
``S@<version>``; Ray Serve prefers a replica that already holds it. Each replica keeps an
LRU of loaded experts (``@serve.multiplexed``) over one base pipeline, and batches requests
for the same expert that arrive together (``@serve.batch``).

Where things are: the model deployments in :mod:`dreamfleet.serving.deployments`, what the
ingress does for each route in :class:`dreamfleet.serving.gateway.Gateway`, the request
bodies in :mod:`dreamfleet.serving.schemas`; this module only puts them together.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models, which
# are built at run time from the config, as real classes, not as strings.
from dreamfleet.core.config import to_dict
from dreamfleet.serving.config import ServeConfig


def body_limit(max_body_bytes: int):
    """HTTP middleware: 422 for a request whose declared body is over ``max_body_bytes``."""
    from fastapi.responses import JSONResponse

    async def limit_body(request, call_next):
        length = request.headers.get("content-length")
        if length is not None and int(length) > max_body_bytes:
            return JSONResponse(status_code=422, content={"detail": [{
                "loc": ["body"], "type": "too_large",
                "msg": f"request body is {length} bytes, over the limit of {max_body_bytes}"}]})
        return await call_next(request)

    return limit_body


def build_app(cfg: ServeConfig, *, jobs=None):
    """The bound Serve application for ``serve.run``; ``jobs``: the bound deployment that runs
    one-photo ProFusion jobs (``dreamfleet.control.profusion_jobs.jobs_deployment``), if any."""
    from fastapi import FastAPI, Header
    from ray import serve

    from dreamfleet.serving.deployments import ApprenticeModel, ExpertModel
    from dreamfleet.serving.gateway import Gateway
    from dreamfleet.serving.schemas import request_models

    GenerateRequest, OpenAIImageRequest = request_models(cfg)
    from dreamfleet.serving.schemas import ProFusionJobRequest
    app = FastAPI(title="dreamfleet", description="Generate images of your subjects with their DreamBooth experts.")
    app.middleware("http")(body_limit(cfg.max_body_bytes))

    # This shim stays in the factory: FastAPI reads each route's body type from its signature,
    # and the request models are built from the config (their bounds). All logic is Gateway's.
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(app)
    class Ingress(Gateway):
        @app.post("/v1/generate")
        async def generate(self, body: GenerateRequest, authorization: str | None = Header(None)):
            return await self.handle_generate(body, authorization)

        @app.post("/v1/images/generations")
        async def openai_generations(self, body: OpenAIImageRequest, authorization: str | None = Header(None)):
            return await self.handle_openai(body, authorization)

        @app.post("/v1/profusion/jobs", status_code=202)
        async def profusion_jobs(self, body: ProFusionJobRequest, authorization: str | None = Header(None)):
            return await self.handle_profusion_job(body, authorization)

        @app.get("/v1/profusion/jobs/{job_id}")
        async def profusion_job_status(self, job_id: str, authorization: str | None = Header(None)):
            return self.profusion_job(job_id, authorization)

        @app.get("/v1/subjects")
        async def subjects(self, authorization: str | None = Header(None)):
            return self.list_subjects(authorization)

        @app.get("/v1/subjects/{subject_id}/sample.png")
        async def sample(self, subject_id: str, authorization: str | None = Header(None)):
            return self.subject_sample(subject_id, authorization)

        @app.get("/healthz")
        async def healthz(self):
            return self.health()

        @app.get("/metrics")
        async def metrics(self):
            return self.metrics_text()

        @app.get("/v1/serving")
        async def serving_state(self, authorization: str | None = Header(None)):
            """Per-replica state for the dashboard (the same numbers as /metrics)."""
            return self.serving_snapshot(authorization)

    replica = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    model = ExpertModel.options(num_replicas=cfg.replicas, ray_actor_options=replica).bind(to_dict(cfg))
    apprentice = ApprenticeModel.options(ray_actor_options=replica).bind(to_dict(cfg)) if cfg.apprentice else None
    return Ingress.bind(model, apprentice, to_dict(cfg), jobs)
