"""The Ray Serve application: a FastAPI ingress and a multiplexed expert-model deployment.

Routes: ``POST /v1/generate`` (with ``subject``: its expert; with ``demonstrations``: the
zero-shot apprentice deployment, when the server has one), ``POST /v1/images/generations`` (OpenAI-compatible),
``GET /v1/subjects``, ``GET /v1/subjects/{id}/sample.png``, ``GET /healthz``, ``GET /metrics``
(Prometheus text format).

A request for subject S goes to the ``ExpertModel`` deployment with multiplexed model id
``S@<version>``; Ray Serve prefers a replica that already holds it (``@serve.multiplexed``).
Each replica keeps one base pipeline per base model and renders the requests that arrive
together, for any experts, in one engine call (``serving/batcher.py``): plain LoRA experts
share one denoiser pass. The ingress bounds each request (body, size, work, deadline, rate)
and counts every answer; ``docs/serving.md`` has the limits and what each failure answers.

Where things are: the model deployments in :mod:`dreamfleet.serving.deployments`, what the
ingress does for each route in :class:`dreamfleet.serving.gateway.Gateway`, the request
bodies in :mod:`dreamfleet.serving.schemas`; this module only puts them together.
"""

# No `from __future__ import annotations` here: FastAPI must see the request models, which
# are built at run time from the config, as real classes, not as strings.
import os

from dreamfleet.core.config import to_dict
from dreamfleet.serving.config import ServeConfig

OPENAI_ROUTE = "/v1/images/generations"
ERRORS = {  # what the generation routes document besides 200 and 422 (FastAPI adds 422 itself)
    401: {"description": "missing or invalid API key"},
    404: {"description": "unknown subject, or another tenant's (the same answer)"},
    429: {"description": "the tenant is over its rate limit (Retry-After says when to retry)"},
    500: {"description": "generation failed inside the model (the body has the request id)"},
    503: {"description": "the expert cannot be loaded, the replicas' queue is full, or a replica went away "
                         "(Retry-After, when retrying helps)"},
    504: {"description": "the request ran past its deadline (X-Request-Timeout, or the server's default)"},
}

# Ray Serve 2.60's controller kills an HTTP proxy that has not answered its readiness check
# within 5 s (10 s, 15 s... after each restart) or its health check within 10 s. On a busy node
# (two cores shared with training) a proxy's first start can take longer, and serve.start()
# then fails with ActorDiedError ("killed by ray.kill") although the controller would have
# restarted the proxy. dreamfleet starts the controller with these instead; an operator's own
# RAY_SERVE_* variables win.
PROXY_TIMEOUTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


def start_serve(host: str, port: int) -> None:
    """``serve.start`` with the HTTP proxy on ``host:port`` and the proxy timeouts above
    (they apply only when this call creates the Serve controller)."""
    from ray import serve

    env = {k: os.environ.get(k, v) for k, v in PROXY_TIMEOUTS.items()}
    serve.start(http_options={"host": host, "port": port}, controller_options={"runtime_env": {"env_vars": env}})


def _too_large(size: int, limit: int):
    from fastapi import HTTPException

    return HTTPException(422, detail=[{"loc": ["body"], "type": "too_large",
                                       "msg": f"request body is {size} bytes, over the limit of {limit}"}])


class BodyLimit:
    """ASGI middleware: 422 for a body over ``max_bytes``, whether its length is declared or it
    is streamed (chunked), read no further than the limit. A body posted without a JSON content
    type to a ``/v1/`` route (``curl -d``) is read as the JSON it is."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"").decode()
        if declared.isdigit() and int(declared) > self.max_bytes:
            from fastapi.responses import JSONResponse

            e = _too_large(int(declared), self.max_bytes)
            return await JSONResponse(status_code=422, content={"detail": e.detail})(scope, receive, send)
        if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
            scope = self._json_type(scope, headers)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > self.max_bytes:
                raise _too_large(seen, self.max_bytes)
            return message

        await self.app(scope, limited, send)

    @staticmethod
    def _json_type(scope, headers: dict[bytes, bytes]):
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind in (b"", b"application/x-www-form-urlencoded", b"text/plain"):
            rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            return {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
        return scope


class CountAnswers:
    """ASGI middleware: every answer of a generation route goes into the serving metrics by
    status, including those given before a handler runs (401, 422, 429)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time

        from dreamfleet.serving.metrics import ServingMetrics

        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            ServingMetrics.for_process().record(scope["path"], status[0], time.perf_counter() - t0)


def _first(detail) -> tuple[str, str | None, str | None]:
    """(message, param, code) of an error detail: a string, or FastAPI's list of {loc, msg, type}."""
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        d = detail[0]
        loc = [str(x) for x in d.get("loc", []) if x not in ("body", "header", "query")]
        return "; ".join(f"{'.'.join(str(x) for x in e.get('loc', []))}: {e.get('msg')}" for e in detail), \
            (loc[-1] if loc else None), d.get("type")
    return str(detail), None, None


def error_handlers(app) -> None:
    """Errors as JSON on every route (a NaN in a body is not echoed back, so it cannot break the
    answer), in OpenAI's shape on the OpenAI route."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from dreamfleet.serving.gateway import openai_error

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        detail = [{"loc": list(e.get("loc", [])), "msg": str(e.get("msg")), "type": str(e.get("type"))}
                  for e in exc.errors()]
        if request.url.path == OPENAI_ROUTE:
            message, param, code = _first(detail)
            return openai_error(422, message, param=param, code=code)
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        if request.url.path == OPENAI_ROUTE:
            message, param, code = _first(exc.detail)
            return openai_error(exc.status_code, message, param=param, code=code, headers=exc.headers)
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)


def offline_docs(app) -> None:
    """``/docs`` with Swagger UI's assets served from the package (fastapi-offline's copy), not a CDN."""
    from pathlib import Path

    import fastapi_offline
    from fastapi import Request
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles

    static = Path(fastapi_offline.__file__).parent / "static"
    app.mount("/docs-static", StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}/docs-static/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs-static/favicon.png")


def build_app(cfg: ServeConfig, *, jobs=None):
    """The bound Serve application for ``serve.run``; ``jobs``: the bound deployment that runs
    one-photo ProFusion jobs (``dreamfleet.control.profusion_jobs.jobs_deployment``), if any."""
    from fastapi import FastAPI, Header
    from fastapi.responses import PlainTextResponse, Response
    from ray import serve

    from dreamfleet.serving.deployments import ApprenticeModel, ExpertModel
    from dreamfleet.serving.gateway import Gateway
    from dreamfleet.serving.schemas import ProFusionJobRequest, request_models

    GenerateRequest, OpenAIImageRequest = request_models(cfg)
    app = FastAPI(title="dreamfleet", docs_url=None, redoc_url=None,
                  description="Generate images of your subjects with their DreamBooth experts. Every request "
                              "may carry `X-Request-Timeout: <seconds>` (its deadline; 504 past it).")
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(CountAnswers)  # added last: outermost, so it sees the body limit's 422 too
    error_handlers(app)
    offline_docs(app)
    png = {200: {"content": {"image/png": {}}, "description": "a PNG"}, 401: ERRORS[401], 404: ERRORS[404]}
    text = {200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}}
    auth_only = {401: ERRORS[401]}

    # This shim stays in the factory: FastAPI reads each route's body type from its signature,
    # and the request models are built from the config (their bounds). All logic is Gateway's.
    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(app)
    class Ingress(Gateway):
        @app.post("/v1/generate", responses=ERRORS)
        async def generate(self, body: GenerateRequest, authorization: str | None = Header(None),
                           x_request_timeout: str | None = Header(None)):
            return await self.handle_generate(body, authorization, x_request_timeout)

        @app.post(OPENAI_ROUTE, responses=ERRORS)
        async def openai_generations(self, body: OpenAIImageRequest, authorization: str | None = Header(None),
                                     x_request_timeout: str | None = Header(None)):
            return await self.handle_openai(body, authorization, x_request_timeout)

        @app.post("/v1/profusion/jobs", status_code=202, responses={**auth_only, 409: {"description": "id taken"},
                                                                    429: ERRORS[429]})
        async def profusion_jobs(self, body: ProFusionJobRequest, authorization: str | None = Header(None)):
            return await self.handle_profusion_job(body, authorization)

        @app.get("/v1/profusion/jobs/{job_id}", responses={**auth_only, 404: {"description": "unknown job"}})
        async def profusion_job_status(self, job_id: str, authorization: str | None = Header(None)):
            return self.profusion_job(job_id, authorization)

        @app.get("/v1/subjects", responses=auth_only)
        async def subjects(self, authorization: str | None = Header(None)):
            return self.list_subjects(authorization)

        @app.get("/v1/subjects/{subject_id}/sample.png", response_class=Response, responses=png)
        async def sample(self, subject_id: str, authorization: str | None = Header(None)):
            return self.subject_sample(subject_id, authorization)

        @app.get("/healthz")
        async def healthz(self):
            return self.health()

        @app.get("/metrics", response_class=PlainTextResponse, responses=text)
        async def metrics(self):
            return self.metrics_text()

        @app.get("/v1/serving", responses=auth_only)
        async def serving_state(self, authorization: str | None = Header(None)):
            """Per-replica state for the dashboard (the same numbers as /metrics)."""
            return self.serving_snapshot(authorization)

    replica = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    model = ExpertModel.options(num_replicas=cfg.replicas, ray_actor_options=replica,
                                max_ongoing_requests=cfg.max_ongoing_requests,
                                max_queued_requests=cfg.max_queued_requests).bind(to_dict(cfg))
    apprentice = None
    if cfg.apprentice:
        apprentice = ApprenticeModel.options(ray_actor_options=replica, max_ongoing_requests=cfg.max_ongoing_requests,
                                             max_queued_requests=cfg.max_queued_requests).bind(to_dict(cfg))
    return Ingress.bind(model, apprentice, to_dict(cfg), jobs)
