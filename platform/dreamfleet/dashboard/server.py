"""The dashboard's HTTP side: a FastAPI app of JSON endpoints plus one static page.

The page (``static/``, plain HTML/CSS/JS, nothing fetched from the internet) polls the JSON
endpoints every ``poll_s`` seconds. All URLs are relative, so the same app runs alone
(`dreamfleet dashboard`) or under a prefix (``/dashboard`` of `dreamfleet serve`).

Reading is open to loopback clients, and to everyone when no API keys are configured.
Actions (cancel a run, retry a subject, delete an expert version) need an admin key when
keys exist; without keys they are served to loopback clients only.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` (imported inside
# build_dashboard_app) as a real class in the route signatures, not as a string.
import html
import ipaddress
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dreamfleet.core.config import to_dict
from dreamfleet.core.errors import DreamfleetError
from dreamfleet.dashboard import views
from dreamfleet.dashboard.config import DashboardConfig

log = logging.getLogger("dreamfleet.dashboard")
STATIC = Path(__file__).parent / "static"


class Context:
    """What the endpoints share, opened on first use (so the app pickles into a Serve replica)."""

    def __init__(self, cfg: DashboardConfig, snapshot: Callable[[], dict[str, Any]] | None = None):
        self.cfg, self.snapshot = cfg, snapshot
        self._objs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "snapshot": self.snapshot, "_objs": {}}

    def registry(self):
        from dreamfleet.registry import Registry

        if "registry" not in self._objs:
            if not self.cfg.registry:
                raise DreamfleetError("no registry given: start the dashboard with --registry PATH_OR_URI")
            self._objs["registry"] = Registry(self.cfg.registry, create=False)
        return self._objs["registry"]

    def keys(self):
        """The API keys, or None where there is no keys file to read (a remote registry without --keys)."""
        if "keys" not in self._objs:
            from dreamfleet.serving.auth import keys_for

            try:
                self._objs["keys"] = keys_for(self.cfg.keys, self.cfg.registry)
            except DreamfleetError:
                self._objs["keys"] = None
        return self._objs["keys"]

    def ray(self):
        from dreamfleet.dashboard.ray_info import RayJobs

        if "ray" not in self._objs:
            self._objs["ray"] = RayJobs(self.cfg.address, self.cfg.ray_dashboard)
        return self._objs["ray"]

    def serving(self):
        from dreamfleet.dashboard.serving import ServingSource

        if "serving" not in self._objs:
            self._objs["serving"] = ServingSource(self.cfg.serve_url, self.cfg.serve_key, self.snapshot)
        return self._objs["serving"]


def is_loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def build_dashboard_app(cfg: DashboardConfig | str, *, serving_snapshot: Callable[[], dict[str, Any]] | None = None):
    """The dashboard as a FastAPI app; ``cfg`` may be just the registry URI.

    ``serving_snapshot``: a function returning the serving app's snapshot (``ServingMetrics.snapshot``)
    when the dashboard lives in the same process as the serving ingress; else ``cfg.serve_url`` is read.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if isinstance(cfg, str):
        cfg = DashboardConfig(registry=cfg)
    ctx = Context(cfg, serving_snapshot)
    app = FastAPI(title="dreamfleet dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(DreamfleetError)
    async def dreamfleet_error(request: Request, exc: DreamfleetError):
        status = 404 if isinstance(exc, views.NotFound) else 503
        return JSONResponse(status_code=status, content={"error": str(exc)})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = "no such page or file" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(status_code=exc.status_code, content={"error": message})

    class Denied(Exception):
        def __init__(self, status: int, message: str):
            self.status, self.message = status, message

    @app.exception_handler(Denied)
    async def denied(request: Request, exc: Denied):
        return JSONResponse(status_code=exc.status, content={"error": exc.message},
                            headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)

    def caller(request: Request):
        keys = ctx.keys()
        auth = request.headers.get("authorization") or ""
        token = auth.split(" ", 1)[1].strip() if auth.lower().startswith("bearer ") else None
        return keys.authenticate(token) if keys is not None and token else None

    def keys_enabled() -> bool:
        keys = ctx.keys()
        return keys is not None and keys.enabled

    def loopback(request: Request) -> bool:
        return is_loopback(request.client.host if request.client else None)

    def check_read(request: Request) -> None:
        if keys_enabled() and not loopback(request):
            c = caller(request)
            if c is None or not c.admin:
                raise Denied(401, "this dashboard needs an admin API key (enter it at the top right)")

    def check_action(request: Request) -> str:
        """Who acts (for the log); raises unless an admin key, or a loopback client when there are no keys."""
        if keys_enabled():
            c = caller(request)
            if c is None:
                raise Denied(401, "actions need an admin API key (Authorization: Bearer <key>)")
            if not c.admin:
                raise Denied(403, f"key {c.key_id} is not an admin key; actions need one")
            return f"key {c.key_id}"
        if not loopback(request):
            raise Denied(403, "no API keys are configured, so actions are allowed from this machine (loopback) only")
        return "loopback"

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request):
        base = request.scope.get("root_path", "").rstrip("/") + "/"
        page_cfg = {"poll_ms": int(cfg.poll_s * 1000), "registry": cfg.registry}
        text = (STATIC / "index.html").read_text()
        text = text.replace("{{BASE}}", html.escape(base)).replace("{{CONFIG}}", html.escape(json.dumps(page_cfg)))
        return HTMLResponse(text, headers={"Cache-Control": "no-store"})

    @app.get("/api/meta")
    def meta(request: Request):
        check_read(request)
        enabled = keys_enabled()
        can_act = (caller(request) or _NOBODY).admin if enabled else loopback(request)
        return {"registry": cfg.registry, "ray_dashboard": ctx.ray().dashboard(), "keys": enabled, "can_act": can_act,
                "ray_error": ctx.ray().error, "config": to_dict(cfg) | {"serve_key": "***" if cfg.serve_key else None}}

    @app.get("/api/runs")
    def runs(request: Request):
        check_read(request)
        out = views.runs_view(ctx.registry())
        jobs = ctx.ray().jobs()
        for r in out["runs"]:
            r["job"] = _job(r, jobs, ctx.ray().url)
        return out

    @app.get("/api/runs/{run_id}")
    def run(run_id: str, request: Request):
        check_read(request)
        out = views.run_view(ctx.registry(), run_id)
        out["run"]["job"] = _job(out["run"], ctx.ray().jobs(), ctx.ray().url)
        return out

    @app.get("/api/subjects")
    def subjects(request: Request):
        check_read(request)
        return views.subjects_view(ctx.registry())

    @app.get("/api/subjects/{sid}")
    def subject(sid: str, request: Request, version: str | None = None):
        check_read(request)
        _valid_id(sid)
        return views.subject_view(ctx.registry(), sid, version)

    @app.get("/api/subjects/{sid}/versions/{version}/files/{kind}/{name}")
    def expert_file(sid: str, version: str, kind: str, name: str, request: Request):
        check_read(request)
        _valid_id(sid)
        path = views.expert_file(ctx.registry(), sid, version, kind, name)
        # versions are immutable: browsers may keep the images
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/serving")
    def serving(request: Request):
        check_read(request)
        return ctx.serving().read(request.headers.get("authorization"))

    @app.get("/api/apprentice")
    def apprentice(request: Request):
        check_read(request)
        return views.apprentice_view(ctx.cfg.apprentices, ctx.cfg.demo_sets, in_serve=ctx.cfg.in_serve)

    @app.post("/api/runs/{run_id}/cancel")
    def cancel(run_id: str, request: Request):
        who = check_action(request)
        reg = ctx.registry()
        record = reg.run(run_id)
        if record is None:
            raise views.NotFound(f"no run {run_id!r} in the registry {reg.uri}")
        if record.get("state") != "running":
            return JSONResponse(status_code=409, content={"error": f"run {run_id} is {record.get('state')}, not running"})
        job_id = record.get("job_id")
        if not job_id:
            return JSONResponse(status_code=409, content={"error": (
                f"run {run_id} has no Ray job (it was started by `dreamfleet train` in a terminal): "
                "stop it there with Ctrl-C; `dreamfleet submit` runs can be cancelled here")})
        try:
            ctx.ray().stop(job_id, record.get("ray_address"))
        except Exception as e:
            return JSONResponse(status_code=502, content={"error": f"Ray did not stop job {job_id}: {e}"})
        _mark_cancelled(reg, run_id, record)
        log.warning("run %s (job %s) cancelled from the dashboard by %s", run_id, job_id, who)
        return {"ok": True, "message": f"asked Ray to stop job {job_id}; its unfinished subjects are marked failed"}

    @app.post("/api/subjects/{sid}/retry")
    def retry(sid: str, request: Request):
        who = check_action(request)
        _valid_id(sid)
        reg = ctx.registry()
        st = reg.get_state(sid)
        if st is None:
            raise views.NotFound(f"no subject {sid!r} in the registry {reg.uri}")
        if st.state != "failed":
            return JSONResponse(status_code=409, content={"error": f"subject {sid} is {st.state}; only failed subjects are retried"})
        reg.update_state(sid, state="queued", attempts=0, error=None)
        log.warning("subject %s queued again from the dashboard by %s", sid, who)
        return {"ok": True, "message": f"{sid} is queued again: the next `dreamfleet train` of its manifest trains it "
                                       "(the dashboard does not start training)"}

    @app.delete("/api/subjects/{sid}/versions/{version}")
    def delete_version(sid: str, version: str, request: Request):
        who = check_action(request)
        _valid_id(sid)
        removed = ctx.registry().delete(sid, version)
        log.warning("expert %s %s deleted from the dashboard by %s", sid, version, who)
        return {"ok": True, "message": f"deleted {sid} {', '.join(removed)}"}

    return app


class _Nobody:
    admin = False


_NOBODY = _Nobody()


def _valid_id(sid: str) -> None:
    from dreamfleet.core.ids import validate_subject_id

    try:
        validate_subject_id(sid)
    except (ValueError, DreamfleetError) as e:
        raise views.NotFound(f"not a subject id: {e}") from None


def _job(run: dict[str, Any], jobs: dict[str, dict[str, Any]], ray_url: str) -> dict[str, Any] | None:
    job_id = run.get("job_id")
    if not job_id:
        return None
    found = jobs.get(job_id)
    if found:
        return {"id": job_id, **found}
    address = run.get("ray_address") or ""
    base = address.rstrip("/") if address.startswith(("http://", "https://")) else ray_url
    return {"id": job_id, "status": None, "url": f"{base}/#/jobs/{job_id}"}


def _mark_cancelled(reg, run_id: str, record: dict[str, Any]) -> None:
    from dreamfleet.registry.store import now

    for sid in record.get("subjects") or []:
        st = reg.get_state(sid)
        if st is not None and st.run_id == run_id and st.state in ("queued", "training"):
            reg.update_state(sid, state="failed", error="run cancelled from the dashboard")
    reg.update_run(run_id, state="cancelled", cancelled_at=now())


def dashboard_deployment(cfg: DashboardConfig):
    """The dashboard as a Ray Serve application, to run beside the serving app (e.g. at /dashboard)."""
    from ray import serve

    app = build_dashboard_app(cfg)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    @serve.ingress(app)
    class Dashboard:
        pass

    return Dashboard.bind()


def dashboard_for_serve(serve_cfg, *, address: str | None = None):
    """The dashboard to deploy beside `dreamfleet serve`."""
    return dashboard_deployment(serve_dashboard_config(serve_cfg, address=address))


def serve_dashboard_config(serve_cfg, *, address: str | None = None) -> DashboardConfig:
    """The config of the dashboard beside `dreamfleet serve`: the same registry and keys, its serving
    page reading that app, its Apprentice page showing the apprentice served (if any)."""
    host = "127.0.0.1" if serve_cfg.host in ("", "0.0.0.0", "::") else serve_cfg.host
    host = f"[{host}]" if ":" in host else host
    return DashboardConfig(registry=serve_cfg.registry, keys=serve_cfg.keys, address=address,
                           serve_url=f"http://{host}:{serve_cfg.port}", in_serve=True,
                           apprentices=[serve_cfg.apprentice] if serve_cfg.apprentice else [])


def serve_forever(cfg: DashboardConfig) -> None:
    """Run the dashboard alone with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(build_dashboard_app(cfg), host=cfg.host, port=cfg.port, log_level="warning")
