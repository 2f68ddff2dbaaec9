"""The Serve app on a local Ray over HTTP: routing, OpenAI client, tenants, limits, hot experts, load."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import (
    fast_config,
    free_port,
    picture,
    pipeline_images,
    plain_pipeline,
    stock_pipeline,
    wait_healthy,
)
from PIL import Image

from dreamfleet.core.expert import ExpertInfo
from dreamfleet.registry import Registry
from dreamfleet.serving.auth import KeyStore
from dreamfleet.serving.config import ServeConfig
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject

pytestmark = pytest.mark.usefixtures("ray_local")
GEN = {"steps": 3, "seed": 7, "width": 64, "height": 64}


def train(tmp: Path, sid: str, seed: int, tenant: str | None, method: str = "lora", base: str = "tiny-random",
          **kw) -> Path:
    subject = SubjectData(sid, "dog", [picture(seed * 10 + i) for i in range(3)], tenant=tenant)
    cfg = fast_config(steps=6, learning_rate=5e-2 if method == "lora" else 5e-3, method=method, seed=seed, **kw)
    return train_subject(subject, base, cfg, tmp / "experts" / sid,
                         class_cache=ClassImageCache(tmp / "cache"), progress=False).expert_dir


def clone_expert(src: Path, dest: Path, sid: str, tenant: str | None) -> Path:
    """A real expert's weights under another subject id (for the load test's 20 experts)."""
    shutil.copytree(src, dest)
    info = json.loads((dest / "expert.json").read_text())
    info.update(subject_id=sid, tenant=tenant)
    (dest / "expert.json").write_text(json.dumps(info))
    return dest


def promptnet(tmp: Path) -> Path:
    """A PromptNet for tiny-random, pre-trained for 2 steps (the one-photo flow's encoder)."""
    from helpers import manifest_with_a_broken_subject

    from dreamfleet.trainers.profusion import PromptNetConfig, pretrain_promptnet

    out = tmp / "promptnet"
    pretrain_promptnet(manifest_with_a_broken_subject(tmp / "pn-data"), "tiny-random",
                       PromptNetConfig(steps=2, batch_size=2, checkpoint_every=0), out, progress=False)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from ray import serve

    from dreamfleet.serving.app import build_app, start_serve

    tmp = tmp_path_factory.mktemp("serving")
    reg = Registry(tmp / "reg")
    experts = {"alpha": train(tmp, "alpha", 1, "acme"), "beta": train(tmp, "beta", 2, "bravo"),
               "gamma": train(tmp, "gamma", 3, None, method="full"),
               "delta": train(tmp, "delta", 4, "bravo", method="full", train_text_encoder=True),
               "xl": train(tmp, "xl", 5, "bravo", base="tiny-sdxl", train_text_encoder=True),
               "sd3": train(tmp, "sd3", 7, "bravo", base="tiny-sd3"),
               "flux": train(tmp, "flux", 6, "bravo", base="tiny-flux"),
               "zimage": train(tmp, "zimage", 8, "bravo", base="tiny-zimage")}
    for sid, folder in experts.items():
        reg.publish(sid, folder)
    keys = KeyStore(tmp / "reg" / "serving" / "keys.json")
    tokens = {"acme": keys.create("acme")[1], "bravo": keys.create("bravo")[1], "admin": keys.create(None, admin=True)[1],
              "acme-metered": keys.create("acme", name="metered", rate_per_min=6)[1]}  # 1 every 10 s
    cfg = ServeConfig(registry=str(tmp / "reg"), port=free_port(), max_models_per_replica=4, host_cache_size=8,
                      max_body_bytes=1_000_000, registry_ttl_s=0.5, promptnet=str(promptnet(tmp)),
                      profusion_steps=3, profusion_views=2, profusion_batch_size=2, max_profusion_jobs=1)
    try:  # a fixture that fails half-way must not leave its Serve to the next module
        start_serve("127.0.0.1", cfg.port)
        from dreamfleet.control.profusion_jobs import jobs_deployment

        serve.run(build_app(cfg, jobs=jobs_deployment(cfg)), name="dreamfleet", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{cfg.port}"
        wait_healthy(url, 120)
        yield {"url": url, "tokens": tokens, "reg": reg, "tmp": tmp, "experts": experts, "cfg": cfg}
    finally:
        serve.shutdown()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float32)


def post(server, body, token="admin", path="/v1/generate"):
    return httpx.post(server["url"] + path, json=body, headers=auth(server["tokens"][token]), timeout=120)


def test_health_subjects_and_tenant_isolation(server):
    assert httpx.get(server["url"] + "/healthz").json()["status"] == "ok"
    assert httpx.get(server["url"] + "/v1/subjects").status_code == 401
    assert httpx.get(server["url"] + "/v1/subjects", headers=auth("df_00000000_nope")).status_code == 401
    listed = httpx.get(server["url"] + "/v1/subjects", headers=auth(server["tokens"]["acme"])).json()["subjects"]
    assert sorted(s["subject"] for s in listed) == ["alpha", "gamma"]  # own + untenanted, never bravo's
    alpha = next(s for s in listed if s["subject"] == "alpha")
    assert alpha["identifier"] and alpha["class_noun"] == "dog" and alpha["version"] == "v0001"
    sample = httpx.get(server["url"] + alpha["sample_url"], headers=auth(server["tokens"]["acme"]))
    assert sample.status_code == 200 and sample.content[:4] == b"\x89PNG"

    ok = post(server, {"subject": "alpha", "prompt": "a photo of {subject}", **GEN}, token="acme")
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert body["version"] == "v0001" and body["seed"] == 7 and len(body["images"]) == 1
    assert body["prompt"] == f"a photo of {alpha['identifier']} dog"
    assert decode(body["images"][0]).shape == (64, 64, 3)
    other = post(server, {"subject": "beta", "prompt": "a [V]", **GEN}, token="acme")
    missing = post(server, {"subject": "nosuch", "prompt": "a [V]", **GEN}, token="acme")
    assert other.status_code == missing.status_code == 404
    assert other.json()["detail"][0]["loc"] == missing.json()["detail"][0]["loc"] == ["body", "subject"]
    no_key = httpx.post(server["url"] + "/v1/generate", json={"subject": "alpha", "prompt": "x", **GEN})
    assert no_key.status_code == 401


def test_the_serve_controller_runs_with_dreamfleets_proxy_timeouts(server):
    """Ray's 5-s proxy readiness check killed proxies on a busy 2-core CI machine (serve.start
    raised ActorDiedError); start_serve gives this Ray's controller longer ones."""
    import os

    import ray

    from dreamfleet.serving.app import PROXY_TIMEOUTS

    raylet = ray.get(ray.remote(num_cpus=0)(lambda: os.environ["RAY_RAYLET_PID"]).remote())
    envs = [process_env(p) for p in Path("/proc").iterdir() if p.name.isdigit() and b"ServeController" in _read(p / "cmdline")]
    ours = [e for e in envs if e.get("RAY_RAYLET_PID") == raylet]
    assert len(ours) == 1 and ours[0].items() >= PROXY_TIMEOUTS.items(), ours


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended while we looked
        return b""


def process_env(proc: Path) -> dict[str, str]:
    pairs = (kv.split(b"=", 1) for kv in _read(proc / "environ").split(b"\0") if b"=" in kv)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def test_routing_under_interleaving_has_no_adapter_bleed(server):
    from dreamfleet.serving.engine import ExpertEngine, GenItem

    engine = ExpertEngine(str(server["reg"].uri))
    item = GenItem("a photo of {subject}", 1, GEN["steps"], 7.5, GEN["seed"], 64, 64)
    reference = {}
    for sid in ("alpha", "beta", "gamma"):
        info = ExpertInfo.read(server["reg"].fetch(sid))
        ref_item = GenItem(info.prompt(item.prompt), 1, item.steps, 7.5, item.seed, 64, 64)
        reference[sid] = np.asarray(engine.generate(sid, "v0001", [ref_item])[0][0], dtype=np.float32)
    assert np.abs(reference["alpha"] - reference["beta"]).mean() > 3  # the experts really differ

    order = ["alpha", "beta", "gamma"] * 6
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda s: post(server, {"subject": s, "prompt": "a photo of {subject}", **GEN}), order))
    for sid, reply in zip(order, replies, strict=True):
        assert reply.status_code == 200, reply.text
        got = decode(reply.json()["images"][0])
        own = np.abs(got - reference[sid]).mean()
        others = min(np.abs(got - reference[o]).mean() for o in reference if o != sid)
        assert own < 1.0 and others > 3.0, (sid, own, others)


def test_full_expert_with_text_encoder_is_served_as_plain_diffusers_renders_it(server):
    """delta: a full expert trained with --train-text-encoder; the app applies its UNet and its
    text encoder, so the image is a plain diffusers pipeline's with both loaded (8-bit: within
    one level for a reduction-order difference between the replica and this process)."""
    reply = post(server, {"subject": "delta", "prompt": "a photo of {subject}", **GEN})
    assert reply.status_code == 200, reply.text
    got = decode(reply.json()["images"][0]).astype(np.int16)
    plain = plain_pipeline(server["experts"]["delta"], server["tmp"])
    want = pipeline_images(plain, [reply.json()["prompt"]], [GEN["seed"]], GEN["steps"], size=GEN["width"])[0]
    assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("sid", ["xl", "sd3", "flux", "zimage"])
def test_every_family_is_served_as_its_stock_pipeline_renders_it(server, sid):
    """An SDXL expert (LoRA on the UNet and both text encoders), an SD3, a Flux.1 and a Z-Image expert, hot-swapped
    into their family's pipeline in the replica: the stock diffusers pipeline with
    ``load_lora_weights`` renders the same image (within one 8-bit level, as above); the OpenAI
    route serves them too."""
    reply = post(server, {"subject": sid, "prompt": "a photo of {subject}", **GEN})
    assert reply.status_code == 200, reply.text
    got = decode(reply.json()["images"][0]).astype(np.int16)
    stock = stock_pipeline(server["experts"][sid], server["tmp"])
    want = pipeline_images(stock, [reply.json()["prompt"]], [GEN["seed"]], GEN["steps"], size=GEN["width"])[0]
    assert np.abs(got - want).max() <= 1
    openai = post(server, {"model": sid, "prompt": "a [V] on the beach", "n": 1, "size": "64x64",
                           "response_format": "b64_json"}, path="/v1/images/generations")
    assert openai.status_code == 200, openai.text
    assert decode(openai.json()["data"][0]["b64_json"]).shape == (64, 64, 3)


def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key=server["tokens"]["acme"])
    result = client.images.generate(model="alpha", prompt="a [V] on the beach", n=2, size="64x64",
                                    response_format="b64_json")
    assert len(result.data) == 2
    assert decode(result.data[0].b64_json).shape == (64, 64, 3)
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="beta", prompt="a [V]", n=1, size="64x64", response_format="b64_json")
    # OpenAI's error shape, so the SDK shows the message, not just "Error code: 404"
    assert "unknown subject 'beta'" in str(missing.value) and missing.value.body["param"] == "model"
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.images.generate(model="alpha", prompt="a [V]", n=1, size="60x64", response_format="b64_json")
    assert bad.value.body["param"] == "size" and "multiples of 8" in bad.value.body["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"steps": 101}, "steps"),
        ({"steps": 0}, "steps"),
        ({"num_images": 9}, "num_images"),
        ({"width": 100}, "width"),
        ({"width": 2048}, "width"),
        ({"height": 8}, "height"),  # under half the base model's native side
        ({"steps": "5"}, "steps"),
        ({"seed": -1}, "seed"),
        ({"guidance_scale": "high"}, "guidance_scale"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a dog " * 60}, "prompt"),
        ({"colour": "red"}, "colour"),
        ({"subject": 42}, "subject"),
    ],
)
def test_limits_answer_422_naming_the_field(server, change, field):
    body = {"subject": "alpha", "prompt": "a [V]", **GEN, **change}
    r = post(server, body)
    assert r.status_code == 422, r.text
    assert any(field in d["loc"] for d in r.json()["detail"]), r.json()


def test_body_over_limit_and_openai_limits(server):
    r = httpx.post(server["url"] + "/v1/generate", content=b"{" + b" " * 1_100_000 + b"}",
                   headers={**auth(server["tokens"]["admin"]), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    for body, field in (({"n": 0}, "n"), ({"size": "63x64"}, "size"), ({"n": 20}, "n")):
        r = post(server, {"model": "alpha", "prompt": "a [V]", **body}, path="/v1/images/generations")
        assert r.status_code == 422 and r.json()["error"]["param"] == field, r.text  # OpenAI's error shape


def test_new_expert_appears_without_restart(server):
    folder = clone_expert(server["experts"]["alpha"], server["tmp"] / "late", "late", None)
    assert post(server, {"subject": "late", "prompt": "a [V]", **GEN}).status_code == 404
    t0 = time.time()
    server["reg"].publish("late", folder)
    while time.time() - t0 < 15:
        r = post(server, {"subject": "late", "prompt": "a [V]", **GEN})
        if r.status_code == 200:
            break
        time.sleep(0.2)
    assert r.status_code == 200 and time.time() - t0 < 10


def test_a_damaged_expert_is_503_naming_it_and_the_server_stays_up(server):
    folder = clone_expert(server["experts"]["alpha"], server["tmp"] / "broken", "broken", None)
    weights = folder / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    server["reg"].publish("broken", folder)
    time.sleep(0.6)
    r = post(server, {"subject": "broken", "prompt": "a [V]", **GEN})
    assert r.status_code == 503 and r.json()["request_id"] == r.headers["X-Dreamfleet-Request-ID"]
    assert "broken@v0001" in r.json()["error"]
    assert post(server, {"subject": "alpha", "prompt": "a [V]", **GEN}).status_code == 200


LONG = {"steps": 100, "width": 128, "height": 128, "seed": 1}  # minutes of CPU if it ran to the end


def quick(server) -> float:
    t0 = time.perf_counter()
    assert post(server, {"subject": "alpha", "prompt": "a [V]", **GEN, "steps": 1}).status_code == 200
    return time.perf_counter() - t0


def test_deadline_answers_504_and_stops_the_work(server):
    t0 = time.perf_counter()
    r = httpx.post(server["url"] + "/v1/generate", json={"subject": "alpha", "prompt": "a [V]", **LONG},
                   headers={**auth(server["tokens"]["admin"]), "X-Request-Timeout": "1.5"}, timeout=120)
    assert r.status_code == 504 and time.perf_counter() - t0 < 10, r.text
    assert r.json()["request_id"] == r.headers["X-Dreamfleet-Request-ID"] and "deadline" in r.json()["error"]
    assert quick(server) < 15  # the replica stopped the long pass between steps
    bad = httpx.post(server["url"] + "/v1/generate", json={"subject": "alpha", "prompt": "a [V]", **GEN},
                     headers={**auth(server["tokens"]["admin"]), "X-Request-Timeout": "-1"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["header", "X-Request-Timeout"]


def test_a_client_going_away_cancels_its_work(server):
    """A dropped request must not hold the replica: before, a 1-step request waited 43 s behind it."""
    def cancelled() -> int:
        state = httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["admin"])).json()
        return sum(r["stats"].get("cancelled", 0) for r in state["replicas"].values())

    before = cancelled()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server["url"] + "/v1/generate", json={"subject": "alpha", "prompt": "a [V]", **LONG},
                   headers=auth(server["tokens"]["admin"]), timeout=1.5)
    assert quick(server) < 15
    assert cancelled() > before


def test_work_budget_answers_422_naming_the_limit(server):
    r = post(server, {"subject": "alpha", "prompt": "a [V]", "steps": 100, "width": 1024, "height": 1024})
    assert r.status_code == 422 and "max_pixel_steps" in r.json()["detail"][0]["msg"], r.text


def test_nan_and_infinity_answer_422_as_json(server):
    for value in ("NaN", "Infinity", "-Infinity"):
        body = '{"subject": "alpha", "prompt": "a [V]", "guidance_scale": ' + value + "}"
        r = httpx.post(server["url"] + "/v1/generate", content=body, timeout=30,
                       headers={**auth(server["tokens"]["admin"]), "Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "guidance_scale"], r.text


def test_a_chunked_body_cannot_pass_the_limit(server):
    def chunks():
        for _ in range(13):
            yield b" " * 1_000_000

    r = httpx.post(server["url"] + "/v1/generate", content=chunks(), timeout=60,
                   headers={**auth(server["tokens"]["admin"]), "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "too_large", r.text


def test_curl_style_body_sizes_from_the_base_and_offline_docs(server):
    """`curl -d` sends form-urlencoded: read as JSON. No size asked: the base model's native side."""
    body = json.dumps({"subject": "alpha", "prompt": "a [V]", "steps": 1, "seed": 1})
    r = httpx.post(server["url"] + "/v1/generate", content=body, headers={
        **auth(server["tokens"]["admin"]), "Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    native = ExpertInfo.read(server["reg"].fetch("alpha")).base_model["resolution"]
    assert r.status_code == 200 and (r.json()["width"], r.json()["height"]) == (native, native), r.text
    small = post(server, {"subject": "alpha", "prompt": "a [V]", "steps": 1, "width": native // 2, "height": native // 2})
    assert small.status_code == 200
    docs = httpx.get(server["url"] + "/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text and "/docs-static/swagger-ui-bundle.js" in docs.text
    js = httpx.get(server["url"] + "/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 500_000


def test_every_answer_is_counted_and_tenants_see_only_their_experts(server):
    def counts() -> dict[str, float]:
        out: dict[str, float] = {}
        for line in httpx.get(server["url"] + "/metrics").text.splitlines():
            if line.startswith("dreamfleet_requests_total{"):
                code = line.split('code="')[1].split('"')[0]
                out[code] = out.get(code, 0) + float(line.rsplit(" ", 1)[1])
        return out

    before = counts()
    assert post(server, {"subject": "alpha", "prompt": "a [V]", **GEN}, token="bravo").status_code == 404
    assert httpx.post(server["url"] + "/v1/generate", json={"subject": "alpha", "prompt": "a [V]"},
                      headers=auth("df_x_y")).status_code == 401
    assert post(server, {"subject": "alpha"}).status_code == 422
    after = counts()
    for code in ("404", "401", "422"):
        assert after.get(code, 0) == before.get(code, 0) + 1, (code, before, after)
    state = httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["admin"])).json()
    assert state["requests_rejected"] >= 3 and state["requests_error"] >= 0
    # an expert used again and again is loaded once: no host-cache load per request
    for _ in range(2):
        post(server, {"subject": "beta", "prompt": "a [V]", **GEN}, token="bravo")
    loads = lambda st: sum(r["stats"]["loads_host"] + r["stats"]["loads_disk"] for r in st["replicas"].values())  # noqa: E731
    first = loads(httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["admin"])).json())
    for _ in range(3):
        post(server, {"subject": "beta", "prompt": "a [V]", **GEN}, token="bravo")
    admin = httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["admin"])).json()
    assert loads(admin) == first
    mine = httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["bravo"])).json()
    seen = [k for r in mine["replicas"].values() for k in r["loaded"]]
    assert "beta@v0001" in seen and not [k for k in seen if k.split("@")[0] in ("alpha", "gamma", "broken")]


# 60 requests (3 per expert) already rotate 20 experts through an LRU of 4 under 16 clients;
# the 200-request run (~100 s here) is `make test-slow`'s.
@pytest.mark.parametrize("requests", [60, pytest.param(200, marks=pytest.mark.slow)])
def test_bounded_load_20_experts_16_clients(server, requests):
    reg = server["reg"]
    names = [f"load{i:02d}" for i in range(20)]
    for i, sid in enumerate(names):
        src = server["experts"]["alpha" if i % 2 else "beta"]
        reg.publish(sid, clone_expert(src, server["tmp"] / f"load-{requests}" / sid, sid, None))
    time.sleep(0.6)
    statuses: list[int] = []
    lock = threading.Lock()
    t0 = time.time()

    def one(i: int) -> None:
        r = post(server, {"subject": names[i % 20], "prompt": "a [V]", "steps": 2, "seed": i, "width": 64, "height": 64})
        with lock:
            statuses.append(r.status_code)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(requests)))
    assert time.time() - t0 < 600
    assert len(statuses) == requests and not [s for s in statuses if s >= 500], statuses
    assert set(statuses) == {200}
    metrics = httpx.get(server["url"] + "/metrics").text
    assert "dreamfleet_requests_total" in metrics and "dreamfleet_expert_cache_total" in metrics
    state = httpx.get(server["url"] + "/v1/serving", headers=auth(server["tokens"]["admin"])).json()
    assert state["requests_ok"] >= requests and state["replicas"]
    evictions = sum(r["stats"]["evictions"] for r in state["replicas"].values())
    assert evictions > 0  # 20 experts rotate through an LRU of 4


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_one_photo_profusion_flow_over_http(server):
    """Post one photo and a class noun, poll the job, generate with the new expert (Fusion
    Sampling); a corrupt photo is 422 naming it, another tenant's job 404, a second job while
    the server runs its one allowed job 429."""
    photo = png_b64(picture(41))
    r = post(server, {"photo": photo, "class_noun": "dog"}, token="acme", path="/v1/profusion/jobs")
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["status_url"] == f"/v1/profusion/jobs/{job['job_id']}"
    busy = post(server, {"photo": photo, "class_noun": "dog"}, token="acme", path="/v1/profusion/jobs")
    assert busy.status_code == 429 and busy.headers["Retry-After"]
    bad = post(server, {"photo": base64.b64encode(b"\x89PNG not really").decode(), "class_noun": "dog"},
               token="acme", path="/v1/profusion/jobs")
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "photo"]
    url = server["url"] + job["status_url"]
    assert httpx.get(url, headers=auth(server["tokens"]["bravo"]), timeout=30).status_code == 404
    deadline, state = time.time() + 300, {}
    while time.time() < deadline:
        state = httpx.get(url, headers=auth(server["tokens"]["acme"]), timeout=30).json()
        if state["state"] in ("done", "failed"):
            break
        time.sleep(1)
    assert state["state"] == "done" and state["version"] == "v0001", state
    info = server["reg"].expert_info(job["subject"])
    assert info.method == "profusion" and info.tenant == "acme" and info.num_images == 1
    from dreamfleet.dashboard.views import subjects_view

    rows = {r["subject"]: r for r in subjects_view(server["reg"])["subjects"]}  # the dashboard's subjects page
    assert rows[job["subject"]]["run_id"] == "profusion-http" and rows[job["subject"]]["state"] == "done"
    body = {"subject": job["subject"], "prompt": "a [V] dog on the beach", "version": state["version"], "num_images": 2,
            "fusion": {"refine_step": 1, "guidance_scale_ref": 3.0}, **GEN}
    r = post(server, body, token="acme")
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 2 and decode(r.json()["images"][0]).shape == (64, 64, 3)
    assert post(server, body, token="bravo").status_code == 404


def test_fusion_sampling_on_a_dreambooth_expert_over_http(server):
    body = {"subject": "alpha", "prompt": "a [V] dog on the beach", "num_images": 1, **GEN}
    plain = post(server, body, token="acme")
    fused = post(server, {**body, "fusion": {"refine_step": 1, "guidance_scale_ref": 2.0}}, token="acme")
    assert plain.status_code == fused.status_code == 200, fused.text
    assert not np.array_equal(decode(plain.json()["images"][0]), decode(fused.json()["images"][0]))
    again = post(server, {**body, "fusion": {"refine_step": 1, "guidance_scale_ref": 2.0}}, token="acme")
    assert np.array_equal(decode(again.json()["images"][0]), decode(fused.json()["images"][0]))  # seeded
    assert post(server, {**body, "fusion": {"refine_step": 9}}, token="acme").status_code == 422
    assert post(server, {**body, "subject": "xl", "fusion": {}}, token="bravo").status_code == 422


def test_one_tenant_over_its_rate_does_not_starve_the_others(server):
    """acme's metered key (6 a minute, in a bucket of its own, the server's burst of 60) sends 100
    requests: past the burst it is refused, however fast this machine answers (at the server's
    600 a minute a slow, busy machine never got past the refill). Unknown subjects answer fast,
    404 when admitted."""
    body = {"subject": "nobody", "prompt": "a [V]", **GEN}
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: post(server, body, token="acme-metered"), range(100)))
    admitted_at_most = 60 + (time.monotonic() - t0) / 10 + 1
    limited = [r for r in codes if r.status_code == 429]
    assert set(r.status_code for r in codes) == {404, 429} and len(codes) - len(limited) <= admitted_at_most
    assert int(limited[0].headers["Retry-After"]) >= 1 and "acme" in limited[0].json()["detail"]
    assert post(server, body, token="bravo").status_code == 404  # bravo is still admitted
    assert post(server, body, token="acme").status_code == 404  # and so are acme's other keys


def test_failures_map_to_statuses_a_client_can_act_on():
    """The replica's queue full (Ray Serve's back-pressure), a dead replica, a damaged expert, a
    deadline, a model failure: each answers with its status, the request id and, where retrying
    helps, Retry-After."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from dreamfleet.serving.engine import Cancelled, ExpertUnavailable
    from dreamfleet.serving.gateway import failure_for

    cases = [(BackPressureError(num_queued_requests=64, max_queued_requests=64), 503, True),
             (ActorDiedError(), 503, True), (ExpertUnavailable("expert x@v0001 could not be loaded"), 503, False),
             (Cancelled("late"), 504, False), (RuntimeError("boom"), 500, False)]
    for exc, status, retry in cases:
        answer = failure_for(exc, "rid1", 30.0)
        body = json.loads(answer.body)
        assert answer.status_code == status and body["request_id"] == "rid1", (exc, answer.status_code)
        assert ("retry-after" in answer.headers) == retry, exc
