"""What the HTTP ingress does for each route: authentication, tenant checks, registry look-ups,
prompt and demonstration checks, and the calls to the model deployments.

``Gateway`` is a plain class; the ``Ingress`` deployment in :func:`dreamfleet.serving.app.build_app`
subclasses it and only declares the routes, each a call of one method here with the parsed body.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import time
import uuid
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from dreamfleet.core.config import from_dict
from dreamfleet.core.expert import ExpertKey
from dreamfleet.serving.config import ServeConfig

log = logging.getLogger("dreamfleet.serving")


def _cancel(response) -> None:
    """Cancel a model request; one that never reached a replica (back-pressure) raises again."""
    with contextlib.suppress(Exception):
        response.cancel()


def failure(status: int, message: str, rid: str, *, retry_after: str | None = None) -> JSONResponse:
    """A 5xx (or 429) answer with the request id, in the body and in a header."""
    headers = {"X-Dreamfleet-Request-ID": rid, **({"Retry-After": retry_after} if retry_after else {})}
    return JSONResponse(status_code=status, headers=headers, content={"error": message, "request_id": rid})


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
    """OpenAI's error shape, which the official SDK shows: ``{"error": {message, type, param, code}}``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    kind = "rate_limit_error" if status == 429 else kind
    return JSONResponse(status_code=status, headers=headers, content={
        "error": {"message": message, "type": kind, "param": param, "code": code or str(status)}})


def as_openai(answer: JSONResponse) -> JSONResponse:
    """A dreamfleet error answer (``failure``) in OpenAI's shape, same status and headers."""
    import json

    body = json.loads(answer.body)
    headers = {k: v for k, v in answer.headers.items() if k.lower() in ("retry-after", "x-dreamfleet-request-id")}
    return openai_error(answer.status_code, f"{body['error']} (request id {body['request_id']})",
                        code=str(answer.status_code), headers=headers)


def failure_for(exc: BaseException, rid: str, timeout: float) -> JSONResponse:
    """What a failed generation answers: 504 past its deadline, 503 when an expert cannot be
    loaded, the replica's queue is full or the replica died (retry), 500 for a failure inside the model."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from dreamfleet.serving.engine import Cancelled, ExpertUnavailable

    if isinstance(exc, Cancelled | asyncio.TimeoutError):
        return failure(504, f"the request ran past its deadline of {timeout:g} s and was stopped", rid)
    if isinstance(exc, ExpertUnavailable):
        return failure(503, str(exc), rid)
    if isinstance(exc, BackPressureError):
        return failure(503, "every model replica's queue is full; retry later", rid, retry_after="2")
    if isinstance(exc, RayActorError) or type(exc).__name__ in ("ActorDiedError", "ActorUnavailableError"):
        return failure(503, "the model replica serving this request went away; retry (Serve restarts it)", rid,
                       retry_after="2")
    return failure(500, "generation failed inside the model; the server is still up", rid)


class Gateway:
    def __init__(self, model, apprentice, cfg_dict: dict[str, Any], jobs=None):
        from dreamfleet.registry import Registry
        from dreamfleet.serving.auth import keys_for
        from dreamfleet.serving.metrics import ServingMetrics

        self.cfg = from_dict(ServeConfig, cfg_dict)
        self.model = model
        self.apprentice = apprentice
        self.jobs = jobs  # the ProFusionJobs deployment (control.profusion_jobs), with --promptnet
        self.apprentice_info = None
        if self.cfg.apprentice:
            from dreamfleet.core.apprentice import ApprenticeInfo

            self.apprentice_info = ApprenticeInfo.read(self.cfg.apprentice)
        self.registry = Registry(self.cfg.registry, create=False)
        self.keys = keys_for(self.cfg.keys, self.cfg.registry)
        from dreamfleet.serving.limits import TenantRateLimit

        self.metrics = ServingMetrics.for_process()
        self.limiter = TenantRateLimit(self.cfg.rate_limit_per_min, self.cfg.rate_limit_burst)
        self._latest: dict[str, tuple[float, str | None]] = {}
        self._infos: dict[tuple[str, str], Any] = {}

    # ------------------------------------------------------------------ helpers

    def _caller(self, authorization: str | None):
        from dreamfleet.serving.auth import ANONYMOUS_ADMIN

        if not self.keys.enabled:
            return ANONYMOUS_ADMIN
        token = authorization.split(" ", 1)[1].strip() if authorization and authorization.lower().startswith("bearer ") else None
        caller = self.keys.authenticate(token)
        if caller is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})
        return caller

    def _latest_version(self, subject_id: str) -> str | None:
        now = time.monotonic()
        hit = self._latest.get(subject_id)
        if hit is None or now - hit[0] > self.cfg.registry_ttl_s:
            try:
                version = self.registry.latest(subject_id)
            except Exception:
                version = None
            self._latest[subject_id] = (now, version)
        return self._latest[subject_id][1]

    def _info(self, subject_id: str, version: str):
        key = (subject_id, version)
        if key not in self._infos:
            self._infos[key] = self.registry.expert_info(subject_id, version)
        return self._infos[key]

    def _resolve(self, caller, subject_id: str, version: str | None, field: str = "subject"):
        """The expert, or 404 for unknown subjects and other tenants' subjects alike."""
        not_found = HTTPException(404, detail=[{"loc": ["body", field], "type": "not_found",
                                                "msg": f"unknown subject {subject_id!r}"}])
        try:
            from dreamfleet.core.ids import validate_subject_id

            validate_subject_id(subject_id)
            v = version or self._latest_version(subject_id)
            if v is None or (version and version not in self.registry.versions(subject_id)):
                raise not_found
            info = self._info(subject_id, v)
        except HTTPException:
            raise
        except Exception:
            raise not_found from None
        if not caller.may_use(info.tenant):
            raise not_found
        return info, v

    def _check_prompt(self, base_spec: str, prompt: str) -> None:
        """422 for a prompt longer than the base model's text encoder takes."""
        from dreamfleet.core.models import load_tokenizer

        tok = load_tokenizer(base_spec)
        n = len(tok(prompt).input_ids)
        if n > tok.model_max_length:
            raise HTTPException(422, detail=[{"loc": ["body", "prompt"], "type": "too_long",
                                              "msg": f"prompt is {n} tokens, over the limit of {tok.model_max_length}"}])

    async def _run(self, info, version, item: dict[str, Any], timeout: float):
        """Ask the model deployment for one request's images: (images, request id, None), or
        (None, request id, the error answer)."""
        handle = self.model.options(multiplexed_model_id=str(ExpertKey(info.subject_id, version)))
        reply, rid, error = await self._await(handle.generate.remote({**item, "deadline": time.time() + timeout}),
                                              timeout)
        return (None, rid, error) if error is not None else (reply["images"], rid, None)

    async def _await(self, response, timeout: float):
        """A model deployment's reply: (reply, request id, None), or (None, request id, the error
        answer). Past ``timeout`` the request is cancelled on the replica too (its pass stops
        between denoising steps), as when the client goes away."""
        rid = uuid.uuid4().hex[:16]
        try:
            reply = await asyncio.wait_for(response, timeout)
            if isinstance(reply["images"], Exception):
                raise reply["images"]
        except asyncio.CancelledError:  # the client went away
            _cancel(response)
            raise
        except Exception as e:
            _cancel(response)
            log.warning("request %s failed: %s: %s", rid, type(e).__name__, e)
            return None, rid, failure_for(e, rid, timeout)
        self.metrics.generation(reply, len(reply["images"]))
        return reply, rid, None

    def _timeout(self, header: str | None) -> float:
        """The request's deadline in seconds: the X-Request-Timeout header, else the server's default."""
        if header is None:
            return self.cfg.request_timeout_s
        try:
            value = float(header)
        except ValueError:
            value = -1.0
        if not 0 < value <= self.cfg.max_request_timeout_s:
            raise HTTPException(422, detail=[{"loc": ["header", "X-Request-Timeout"], "type": "bad_timeout",
                                              "msg": f"must be seconds in (0, {self.cfg.max_request_timeout_s:g}]"}])
        return value

    def _admit(self, caller) -> None:
        """429 with Retry-After when the caller's tenant (or its key, when the key has a rate of
        its own) is over its rate."""
        tenant = caller.tenant or (f"key:{caller.key_id}" if caller.key_id else "anonymous")
        own = caller.rate_per_min is not None
        wait = self.limiter.admit(f"key:{caller.key_id}" if own else tenant, caller.rate_per_min)
        if wait is not None:
            from dreamfleet.serving.limits import retry_after

            rate = caller.rate_per_min if own else self.cfg.rate_limit_per_min
            who = f"tenant {tenant!r}" + (f" (key {caller.key_id})" if own else "")
            raise HTTPException(429, f"{who} is over its rate of {rate:g} requests a minute; retry later",
                                headers={"Retry-After": retry_after(wait)})

    def _budget(self, width: int, height: int, steps: int, n: int) -> None:
        """422 naming the limit when a request asks for more work than one request may."""
        from dreamfleet.serving.limits import pixel_steps

        work = pixel_steps(width, height, steps, n)
        if work > self.cfg.max_pixel_steps:
            raise HTTPException(422, detail=[{"loc": ["body"], "type": "too_much_work", "msg":
                f"{width}x{height} px x {steps} steps x {n} images = {work} pixel-steps, over this server's "
                f"max_pixel_steps of {self.cfg.max_pixel_steps}; ask for fewer pixels, steps or images"}])

    def _size(self, info, width, height, loc: str | None = None):
        """The request's size: the base model's native side by default; each side at least
        ``min_side_fraction`` of the native side (and ``min_side``), in the multiples the family's latents need."""
        native = int(info.base_model.get("resolution") or 512)
        from dreamfleet.core.families import get_family

        multiple = get_family(info.base_model.get("family", "sd")).side_multiple
        floor = max(self.cfg.min_side, int(native * self.cfg.min_side_fraction) // multiple * multiple, multiple)
        side = min(max(native, floor), self.cfg.max_side)
        width, height = width or side, height or side
        for name, v in (("width", width), ("height", height)):
            if v < floor or v % multiple:
                raise HTTPException(422, detail=[{"loc": ["body", loc or name], "type": "bad_size", "msg":
                    f"{name} {v}: this expert's base model ({info.base_model.get('spec')}) renders sides of at "
                    f"least {floor} px in multiples of {multiple} (native {native} px)"}])
        return width, height

    def _demonstrations(self, body) -> list[bytes]:
        """Decoded demonstration bytes, or 422 naming the one that is bad."""
        return [self._photo(b64, ["body", "demonstrations", i], "demonstration")
                for i, b64 in enumerate(body.demonstrations)]

    def _photo(self, b64: str, loc: list, what: str) -> bytes:
        """One base64 photo's bytes, or 422 naming it (``loc``) and what is wrong with it."""
        from dreamfleet.core.errors import DataError
        from dreamfleet.core.images import decode_image

        def bad(kind: str, msg: str):
            return HTTPException(422, detail=[{"loc": loc, "type": kind, "msg": msg}])

        try:
            data = base64.b64decode(b64, validate=True)
        except (ValueError, TypeError):
            raise bad("not_base64", "not valid base64") from None
        if len(data) > self.cfg.max_demo_bytes:
            raise bad("too_large", f"{what} is {len(data)} bytes, over the limit of {self.cfg.max_demo_bytes}")
        try:
            img = decode_image(data, name=".".join(str(x) for x in loc[1:]))
        except DataError as e:
            raise bad("not_an_image", str(e)) from None
        if max(img.size) > self.cfg.max_demo_side:
            raise bad("too_large", f"{what} is {img.size[0]}x{img.size[1]} px, over the limit of "
                                   f"{self.cfg.max_demo_side} px a side")
        return data

    async def _generate_zero_shot(self, body, timeout: float):
        from dreamfleet.core.apprentice import fill_prompt

        if self.apprentice is None:
            raise HTTPException(422, detail=[{"loc": ["body", "demonstrations"], "type": "no_apprentice",
                                              "msg": "this server has no apprentice; ask for a 'subject', or start "
                                                     "the server with --apprentice DIR"}])
        info = self.apprentice_info
        demos = self._demonstrations(body)
        prompt = fill_prompt(body.prompt, info.identifier, body.class_noun)
        self._check_prompt(info.base_model["spec"], prompt)
        width, height = self._size(info, body.width, body.height)
        self._budget(width, height, body.steps, body.num_images)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        item = {"demonstrations": demos, "prompt": body.prompt, "class_noun": body.class_noun,
                "num_images": body.num_images, "steps": body.steps, "guidance_scale": body.guidance_scale,
                "seed": seed, "width": width, "height": height}
        reply, rid, error = await self._await(self.apprentice.generate.remote(item), timeout)
        if error is not None:
            return error
        return JSONResponse(headers={"X-Dreamfleet-Request-ID": rid}, content={
            "images": reply["images"], "subject": None, "apprentice": info.identifier,
            "demonstrations": len(demos), "seed": seed, "prompt": prompt, "width": width, "height": height,
            "request_id": rid})

    # ------------------------------------------------------------------ routes (Ingress delegates)

    async def handle_generate(self, body, authorization: str | None, timeout_header: str | None = None):
        """``POST /v1/generate``: an expert's images, or the apprentice's for demonstrations."""
        caller = self._caller(authorization)
        timeout = self._timeout(timeout_header)
        self._admit(caller)
        if body.demonstrations is not None:
            return await self._generate_zero_shot(body, timeout)  # any valid key: no tenant's data
        info, version = self._resolve(caller, body.subject, body.version)
        prompt = info.prompt(body.prompt)
        self._check_prompt(info.base_model["spec"], prompt)
        width, height = self._size(info, body.width, body.height)
        self._budget(width, height, body.steps, body.num_images)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        if body.fusion is not None and info.base_model.get("family", "sd") != "sd":
            raise HTTPException(422, detail=[{"loc": ["body", "fusion"], "type": "unsupported",
                                              "msg": "Fusion Sampling runs on Stable Diffusion 1.x/2.x experts"}])
        item = {"prompt": prompt, "num_images": body.num_images, "steps": body.steps, "seed": seed,
                "guidance_scale": body.guidance_scale, "width": width, "height": height,
                "fusion": body.fusion.params() if body.fusion is not None else None}
        images, rid, error = await self._run(info, version, item, timeout)
        if error is not None:
            return error
        return JSONResponse(headers={"X-Dreamfleet-Request-ID": rid}, content={
            "images": images, "subject": info.subject_id, "version": version, "seed": seed,
            "prompt": prompt, "width": width, "height": height, "request_id": rid})

    async def handle_openai(self, body, authorization: str | None, timeout_header: str | None = None):
        """``POST /v1/images/generations``, OpenAI's images API; ``model`` is the subject id.
        Errors have OpenAI's shape (``openai_error``), so the official SDK shows their message."""
        caller = self._caller(authorization)
        timeout = self._timeout(timeout_header)
        self._admit(caller)
        info, version = self._resolve(caller, body.model, None, field="model")
        prompt = info.prompt(body.prompt)
        self._check_prompt(info.base_model["spec"], prompt)
        size = [int(x) for x in body.size.split("x")] if body.size else [None, None]
        width, height = self._size(info, *size, loc="size" if body.size else None)
        steps = body.steps or self.cfg.default_steps
        self._budget(width, height, steps, body.n)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
        item = {"prompt": prompt, "num_images": body.n, "steps": steps, "seed": seed, "width": width,
                "height": height, "guidance_scale": self.cfg.default_guidance_scale, "fusion": None}
        images, _rid, error = await self._run(info, version, item, timeout)
        if error is not None:
            return as_openai(error)
        return {"created": int(time.time()), "data": [{"b64_json": b, "revised_prompt": prompt} for b in images]}

    def _new_subject(self, requested: str | None) -> str:
        from dreamfleet.core.ids import validate_subject_id

        sid = requested or f"pf-{uuid.uuid4().hex[:12]}"
        try:
            validate_subject_id(sid)
        except Exception as e:
            raise HTTPException(422, detail=[{"loc": ["body", "subject"], "type": "bad_id", "msg": str(e)}]) from None
        if self.registry.get_state(sid) is not None or self.registry.versions(sid):
            raise HTTPException(409, detail=[{"loc": ["body", "subject"], "type": "exists",
                                              "msg": f"subject {sid!r} exists; choose another id"}])
        return sid

    async def handle_profusion_job(self, body, authorization: str | None):
        """``POST /v1/profusion/jobs``: customise a new subject from one photo (202 and a job id)."""
        from dreamfleet.core.errors import ConfigError
        from dreamfleet.core.identifiers import check_class_noun

        caller = self._caller(authorization)
        if self.jobs is None:
            raise HTTPException(422, detail=[{"loc": ["body"], "type": "no_promptnet",
                                              "msg": "this server has no PromptNet; start it with --promptnet DIR"}])
        photo = self._photo(body.photo, ["body", "photo"], "photo")
        try:
            class_noun = check_class_noun(body.class_noun)
        except ConfigError as e:
            raise HTTPException(422, detail=[{"loc": ["body", "class_noun"], "type": "bad_class", "msg": str(e)}]) from None
        sid = self._new_subject(body.subject)
        reply = await self.jobs.submit.remote({"subject": sid, "class_noun": class_noun, "photo": photo,
                                               "tenant": caller.tenant})
        if reply.get("error") == "too_many":
            raise HTTPException(429, f"{reply['running']} one-photo jobs are running, the most this server runs at "
                                     "once; retry later", headers={"Retry-After": "30"})
        return JSONResponse(status_code=202, content={"job_id": sid, "subject": sid, "state": "queued",
                                                      "status_url": f"/v1/profusion/jobs/{sid}"})

    def profusion_job(self, job_id: str, authorization: str | None):
        """``GET /v1/profusion/jobs/{id}``: the job's state; 404 for unknown and other tenants' jobs."""
        from dreamfleet.serving.config import PROFUSION_JOB_RUN_ID as JOB_RUN_ID

        caller = self._caller(authorization)
        try:
            st = self.registry.get_state(job_id)
        except Exception:
            st = None
        if st is None or st.run_id != JOB_RUN_ID or not caller.may_use(st.tenant):
            raise HTTPException(404, f"unknown job {job_id!r}")
        return {"job_id": job_id, "subject": job_id, "state": st.state, "version": st.version, "error": st.error,
                "step": st.step, "total_steps": st.total_steps}

    def list_subjects(self, authorization: str | None):
        caller = self._caller(authorization)
        out = []
        for sid in self.registry.subjects():
            version = self._latest_version(sid)
            if version is None:
                continue
            try:
                info = self._info(sid, version)
            except Exception:
                continue
            if caller.may_use(info.tenant):
                out.append({"subject": sid, "identifier": info.identifier, "class_noun": info.class_noun,
                            "version": version, "method": info.method, "tenant": info.tenant,
                            "prompt_example": f"a photo of {{subject}} on the beach -> {info.prompt('a photo of {subject} on the beach')}",
                            "sample_url": f"/v1/subjects/{sid}/sample.png"})
        return {"subjects": out}

    def subject_sample(self, subject_id: str, authorization: str | None):
        caller = self._caller(authorization)
        _info, version = self._resolve(caller, subject_id, None)
        folder = self.registry.fetch(subject_id, version)
        grids = sorted((folder / "validation").glob("*.png")) or sorted((folder / "instance").glob("*.png"))
        if not grids:
            return Response(status_code=404)
        return Response(content=grids[-1].read_bytes(), media_type="image/png")

    def health(self):
        return {"status": "ok", "registry": self.cfg.registry, "auth": self.keys.enabled}

    def metrics_text(self):
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    def serving_snapshot(self, authorization: str | None):
        """The replicas' state; a tenant's key sees only the loaded experts it may use."""
        caller = self._caller(authorization)
        snap = self.metrics.snapshot()  # its replicas are a copy
        if not caller.admin:
            for rep in snap["replicas"].values():
                rep["loaded"] = [k for k in rep.get("loaded") or [] if self._visible(caller, k)]
        return snap

    def _visible(self, caller, model_id: str) -> bool:
        try:
            key = ExpertKey.parse(model_id)
            return caller.may_use(self._info(*key).tenant)
        except Exception:
            return False
