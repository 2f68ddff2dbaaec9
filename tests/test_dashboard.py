"""The dashboard: its JSON API on a hand-made registry, then a real run watched in headless Chromium."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from helpers import fast_config, free_port, picture, prefilled_class_cache, subject_folder

from dreamfleet.dashboard.config import DashboardConfig
from dreamfleet.dashboard.server import build_dashboard_app
from dreamfleet.dashboard.serving import snapshot_from_metrics
from dreamfleet.registry import Registry
from dreamfleet.serving.auth import KeyStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LOOPBACK = ("127.0.0.1", 50000)


def fake_expert(folder: Path, sid: str, *, n_steps: int = 5) -> Path:
    """An expert folder with the files the dashboard reads (no weights: nothing here generates)."""
    (folder / "instance").mkdir(parents=True)
    (folder / "validation").mkdir()
    for i in range(2):
        picture(i).save(folder / "instance" / f"{i:02d}.png")
    picture(9, (64, 32)).save(folder / "validation" / "step-00000005.png")
    history = [{"step": s, "loss": 1 / s, "loss_instance": 0.6 / s, "loss_prior": 0.4 / s, "lr": 1e-3} for s in range(1, n_steps + 1)]
    (folder / "loss_history.json").write_text(json.dumps(history))
    (folder / "expert.json").write_text(json.dumps({
        "subject_id": sid, "class_noun": "dog", "identifier": "hux", "instance_prompt": "a photo of hux dog",
        "method": "lora", "base_model": {"spec": "tiny-random"}, "config": {"steps": n_steps}, "code_version": {},
        "input_hash": "0" * 16, "num_images": 2, "final_loss": 0.2, "wall_time_s": 1.0, "created_at": "2025-01-01T00:00:00+00:00",
        "weights": []}))
    return folder


@pytest.fixture()
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "reg")
    reg.publish("dog1", fake_expert(tmp_path / "e1", "dog1"))
    reg.update_state("dog1", state="done", run_id="run-a", step=5, total_steps=5, version="v0001")
    reg.update_state("dog2", state="failed", run_id="run-a", attempts=3, error="subject 'dog2': image 03.jpg is not readable")
    reg.update_state("cat1", state="training", run_id="run-a", step=2, total_steps=5, recent_losses=[0.9, 0.7])
    reg.write_run("run-a", {"manifest": "/m/x", "base_model": "tiny-random", "base_family": "sd",
                            "subjects": ["dog1", "dog2", "cat1"],
                            "skipped": [], "started_at": "2025-01-01T00:00:00+00:00", "state": "running", "job_id": None})
    return reg


def client(reg: Registry, addr=LOOPBACK, **kw):
    return TestClient(build_dashboard_app(DashboardConfig(registry=reg.uri, **kw)), client=addr)


def test_api_reads_runs_subjects_and_experts(registry):
    c = client(registry)
    runs = c.get("/api/runs").json()
    (run,) = runs["runs"]
    assert run["counts"] == {"training": 1, "queued": 0, "failed": 1, "done": 1, "skipped": 0}
    assert run["fraction"] == pytest.approx(0.8) and run["eta_s"] > 0
    assert run["base_family"] == "sd"  # shown beside the base model (the run's family)
    table = {r["subject"]: r for r in c.get("/api/runs/run-a").json()["subjects"]}
    assert table["dog2"]["error"].startswith("subject 'dog2'") and table["dog2"]["attempts"] == 3
    assert table["cat1"]["recent_losses"] == [0.9, 0.7]
    d = c.get("/api/subjects/dog1").json()
    assert [p["loss_prior"] for p in d["curve"]["points"]][:2] == [0.4, 0.2]
    assert d["images"] == {"instance": ["00.png", "01.png"], "validation": ["step-00000005.png"], "validation_all": 1}
    img = c.get("/api/subjects/dog1/versions/v0001/files/instance/00.png")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    # a subject still training: its live losses, and a message instead of an expert
    d = c.get("/api/subjects/cat1").json()
    assert "no published expert yet" in d["message"] and [p["step"] for p in d["curve"]["points"]] == [1, 2]
    page = c.get("/")
    assert page.status_code == 200 and '<base href="/">' in page.text and "static/app.js" in page.text
    assert c.get("/static/app.js").status_code == 200


def test_demo_metrics_show_on_the_subject_page(registry):
    """`dreamfleet demo` stores each expert's metrics with it in the registry: the subject page shows them."""
    from dreamfleet.cli.demo import store_evaluations
    from dreamfleet.eval.evaluate import EvalConfig

    rows = [{"subject": "dog1", "model": "base", "images": 6, "subject_fidelity": 0.05, "prompt_fidelity": 0.9},
            {"subject": "dog1", "model": "DreamBooth", "images": 6, "subject_fidelity": 0.8, "prompt_fidelity": 0.85}]
    store_evaluations(registry, {"dog1": "v0001"}, [{"subject": "dog1", "rows": rows}], EvalConfig(images_per_prompt=1))
    ev = client(registry).get("/api/subjects/dog1").json()["evaluation"]
    assert ev["subject_fidelity"] == 0.8 and ev["subject_fidelity (base model)"] == 0.05
    assert ev["prompt_fidelity"] == 0.85 and ev["images_per_prompt"] == 1 and ev["evaluated_by"] == "dreamfleet demo"
    assert registry.expert_info("dog1").final_loss == 0.2  # the expert itself is untouched


@pytest.fixture()
def web_stub():
    """An HTTP server that answers every GET with 200: a stand-in for Ray's dashboard."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Ok(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ray dashboard")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_ray_dashboard_linked_only_where_one_answers(registry, web_stub, monkeypatch):
    from dreamfleet.dashboard import ray_info

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    meta = lambda **kw: client(registry, **kw).get("/api/meta").json()  # noqa: E731
    assert meta(address=f"http://127.0.0.1:{free_port()}")["ray_dashboard"] is None  # nothing there: no link
    assert meta(address=web_stub)["ray_dashboard"] == web_stub
    assert meta(ray_dashboard="http://head:8265/")["ray_dashboard"] == "http://head:8265"  # given: as given
    # connected to Ray in this process: the dashboard the cluster records, none for the embedded local Ray
    monkeypatch.setattr(ray_info, "_ray_connected", lambda: True)
    monkeypatch.setattr(ray_info, "_recorded_dashboard", lambda: "")
    assert meta(address=None)["ray_dashboard"] is None
    monkeypatch.setattr(ray_info, "_recorded_dashboard", lambda: web_stub)
    assert meta(address=None)["ray_dashboard"] == web_stub


def test_final_loss_says_what_it_averages(registry):
    """The table's loss is the last step's; the expert's final loss a mean over its last steps: labelled so."""
    from dreamfleet.core.expert import FINAL_LOSS_STEPS
    from dreamfleet.trainers.loop import LoopResult

    history = [{"step": i + 1, "loss": float(i)} for i in range(25)]
    result = LoopResult(final_step=25, history=history, resumed_from=None, wall_time_s=1.0, step_time_s=1.0)
    assert result.final_loss == sum(range(25 - FINAL_LOSS_STEPS, 25)) / FINAL_LOSS_STEPS
    d = client(registry).get("/api/subjects/dog1").json()
    assert d["expert"]["final_loss_steps"] == 5  # a 5-step expert: the mean of all 5


def test_apprentice_page_names_the_flags_of_its_command(registry, tmp_path):
    """`dreamfleet dashboard` has --apprentices/--demo-sets; the copy inside `dreamfleet serve` names
    serve's --apprentice and shows the apprentice it serves."""
    from dreamfleet.dashboard.server import serve_dashboard_config
    from dreamfleet.serving.config import ServeConfig

    alone = client(registry).get("/api/apprentice").json()
    assert "--apprentices" in alone["message"] and "--demo-sets" in alone["message"]
    in_serve = serve_dashboard_config(ServeConfig(registry=registry.uri))
    assert in_serve.in_serve and in_serve.apprentices == []
    d = TestClient(build_dashboard_app(in_serve), client=LOOPBACK).get("/api/apprentice").json()
    assert "`dreamfleet serve`" in d["message"] and "--apprentice DIR" in d["message"]
    assert "--apprentices" not in d["message"]
    served = serve_dashboard_config(ServeConfig(registry=registry.uri, apprentice=str(tmp_path / "app")))
    d = TestClient(build_dashboard_app(served), client=LOOPBACK).get("/api/apprentice").json()
    assert d["available"] and [a["path"] for a in d["apprentices"]] == [str(tmp_path / "app")]
    assert "`dreamfleet serve` shows none" in d["hints"]["demo_sets"]


def test_clear_messages_not_500s(registry, tmp_path):
    c = client(registry)
    for path in ("/api/subjects/nobody", "/api/runs/nope", "/api/subjects/dog1?version=v0009",
                 "/api/subjects/dog1/versions/v0001/files/instance/..%2Fexpert.json",
                 "/api/subjects/dog1/versions/v0001/files/weights/x.png", "/api/subjects/dog2/versions/v0001/files/instance/00.png"):
        r = c.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"], path
    missing = client(Registry(tmp_path / "gone"))
    shutil.rmtree(tmp_path / "gone")
    r = missing.get("/api/runs")
    assert r.status_code == 503 and "no registry here" in r.json()["error"]
    assert missing.get("/").status_code == 200  # the page itself still loads and shows the message
    assert c.get("/api/serving").json()["available"] is False
    assert c.get("/api/apprentice").json()["available"] is False


def test_actions_loopback_only_without_keys(registry):
    remote = client(registry, addr=("10.1.2.3", 40000))
    assert remote.get("/api/runs").status_code == 200  # reading is open without keys
    r = remote.post("/api/subjects/dog2/retry")
    assert r.status_code == 403 and "loopback" in r.json()["error"]
    local = client(registry)
    assert local.get("/api/meta").json()["can_act"] is True
    r = local.post("/api/subjects/dog2/retry")
    assert r.status_code == 200 and "next `dreamfleet train`" in r.json()["message"]
    st = registry.get_state("dog2")
    assert (st.state, st.attempts, st.error) == ("queued", 0, None)
    assert local.post("/api/subjects/dog1/retry").status_code == 409  # only failed subjects
    r = local.post("/api/runs/run-a/cancel")
    assert r.status_code == 409 and "Ctrl-C" in r.json()["error"]  # a terminal run has no Ray job
    assert local.delete("/api/subjects/dog1/versions/v0001").status_code == 200
    assert registry.versions("dog1") == [] and registry.latest("dog1") is None
    assert "no published expert" in local.get("/api/subjects/dog1").json()["message"]


def test_actions_need_an_admin_key_when_keys_exist(registry):
    keys = KeyStore(Path(registry.root) / "serving" / "keys.json")
    tenant, admin = keys.create("acme")[1], keys.create(None, admin=True)[1]
    registry.update_state("dog2", state="failed")
    remote = client(registry, addr=("10.1.2.3", 40000))
    assert remote.get("/api/runs").status_code == 401  # keys on: remote readers need an admin key
    assert remote.get("/api/runs", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
    local = client(registry)
    assert local.get("/api/runs").status_code == 200
    assert local.post("/api/subjects/dog2/retry").status_code == 401  # loopback is not enough with keys
    assert local.post("/api/subjects/dog2/retry", headers={"Authorization": f"Bearer {tenant}"}).status_code == 403
    assert local.post("/api/subjects/dog2/retry", headers={"Authorization": "Bearer df_x_y"}).status_code == 401
    ok = remote.post("/api/subjects/dog2/retry", headers={"Authorization": f"Bearer {admin}"})
    assert ok.status_code == 200 and registry.get_state("dog2").state == "queued"


def test_serving_numbers_from_prometheus_text():
    text = "\n".join([
        '# TYPE dreamfleet_requests_total counter',
        'dreamfleet_requests_total{outcome="ok",route="generate"} 3.0',
        'dreamfleet_requests_total{outcome="error",route="generate"} 1.0',
        'dreamfleet_expert_cache_total{result="hit"} 2.0', 'dreamfleet_expert_cache_total{result="disk"} 1.0',
        'dreamfleet_request_latency_seconds_bucket{le="0.1",route="generate"} 1.0',
        'dreamfleet_request_latency_seconds_bucket{le="0.25",route="generate"} 3.0',
        'dreamfleet_request_latency_seconds_bucket{le="+Inf",route="generate"} 3.0',
        'dreamfleet_replica_loaded_experts{replica="r1"} 2.0', 'dreamfleet_replica_loads{replica="r1",source="disk"} 1.0',
    ])
    snap = snapshot_from_metrics(text)
    assert snap["requests_ok"] == 3 and snap["requests_error"] == 1
    assert snap["cache_hit_rate"] == pytest.approx(0.667) and snap["p50_ms"] == pytest.approx(137.5)
    assert snap["replicas"]["r1"]["loaded_count"] == 2 and snap["replicas"]["r1"]["stats"]["loads_disk"] == 1
    # 4xx answers are rejections, not errors; exported recent quantiles win over the buckets' estimate
    exact = snapshot_from_metrics(text + "\n" + "\n".join([
        'dreamfleet_requests_total{code="422",outcome="rejected",route="generate"} 5.0',
        'dreamfleet_request_latency_recent_seconds{quantile="0.5"} 1.442',
        'dreamfleet_request_latency_recent_seconds{quantile="0.99"} 1.635']))
    assert exact["requests_error"] == 1 and exact["requests_rejected"] == 5
    assert (exact["p50_ms"], exact["p99_ms"]) == (1442.0, 1635.0)


# --------------------------------------------------------------------------- the real thing, in a browser


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from dreamfleet.data.build import BuildConfig
    from dreamfleet.data.manifest import Manifest, build_from_folders

    root = tmp_path_factory.mktemp("dash")
    src = root / "src"
    for i, name in enumerate(["dog1", "dog2", "cat1", "broken"]):
        subject_folder(src, name, n=3, seed=i)
    (src / "classes.csv").write_text("subject_id,class_noun\ndog1,dog\ndog2,dog\ncat1,cat\nbroken,dog\n")
    build_from_folders(src, src / "classes.csv", root / "manifest", BuildConfig(min_side=32))
    rec = Manifest.open(root / "manifest").record("broken")  # corrupt one subject: it fails alone
    shard = root / "manifest" / rec.shards[0]
    data = bytearray(shard.read_bytes())
    data[rec.shard_offsets[0] + 600:rec.shard_offsets[0] + 664] = bytes(64)
    shard.write_bytes(bytes(data))
    return str(root / "manifest")


def start_uvicorn(app, port: int):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    assert server.started, "the dashboard server did not start"
    return server


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (.ci/run installs Debian's chromium with apt-get)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright's Python package is not installed (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


def watch_images(page) -> list[str]:
    bad: list[str] = []
    page.on("response", lambda r: bad.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return bad


def test_a_real_run_and_serving_in_chromium(ray_local, manifest, tmp_path, browser, artifacts_dir):
    from ray import serve

    from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
    from dreamfleet.dashboard.server import dashboard_for_serve
    from dreamfleet.serving.app import build_app, start_serve
    from dreamfleet.serving.config import ServeConfig

    reg_uri = str(tmp_path / "reg")
    Registry(reg_uri)
    dash = start_uvicorn(build_dashboard_app(DashboardConfig(registry=reg_uri, poll_s=0.5)), free_port())
    url = f"http://127.0.0.1:{dash.config.port}/"
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = watch_images(page)
    try:
        page.goto(url)
        page.wait_for_selector("text=No runs in this registry yet")
        result: dict = {}
        # best-step selection every 4 steps, scored by a test plugin loaded on the Ray workers
        cfg = fast_config(steps=12, validation_every=6, num_validation_images=2, checkpoint_every=0, select_every=4,
                          select_scorer="helpers:PixelScorer", select_images=1, select_inference_steps=2)
        # class images ready (the page is watched for the run's subjects, not its class images)
        fan = FanoutConfig(class_cache=prefilled_class_cache(tmp_path / "class-images", cfg))
        run = threading.Thread(target=lambda: result.update(s=run_fanout(
            manifest, reg_uri, "tiny-random", cfg, fan, progress=False)))
        run.start()
        # the run shows up as soon as its record is written, without reloading the page
        page.wait_for_selector("#runs-table tr[data-run]", timeout=60_000)
        run_id = page.get_attribute("#runs-table tr[data-run]", "data-run")
        page.click(f"#runs-table tr[data-run='{run_id}'] a")
        page.wait_for_selector("#subjects-table tr[data-subject='dog1']")
        assert sorted(page.eval_on_selector_all("#subjects-table tr[data-subject]", "rs => rs.map(r => r.dataset.subject)")) == \
            ["broken", "cat1", "dog1", "dog2"]
        seen_states = set()
        deadline = time.time() + 150
        while time.time() < deadline:
            states = dict(page.eval_on_selector_all(
                "#subjects-table tr[data-subject]", "rs => rs.map(r => [r.dataset.subject, r.dataset.state])"))
            seen_states |= set(states.values())
            if states == {"dog1": "done", "dog2": "done", "cat1": "done", "broken": "failed"}:
                break
            time.sleep(0.3)
        else:
            raise AssertionError(f"subjects did not finish in the page: {states}")
        run.join(60)
        assert sorted(result["s"].done) == ["cat1", "dog1", "dog2"]
        assert seen_states & {"queued", "training"}, "the page never showed the run in progress"
        assert "hash" in page.inner_text("#subjects-table tr[data-subject='broken'] td.err")
        page.wait_for_selector("#run-head .badge.finished")
        assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # the wide table scrolls inside its box
        page.screenshot(path=str(artifacts_dir / "dashboard-run.png"))
        page.goto(url + "#/runs")
        page.wait_for_selector(f"#runs-table tr[data-run='{run_id}'] .badge.finished")
        page.screenshot(path=str(artifacts_dir / "dashboard-runs.png"))
        page.goto(url + "#/subjects")
        page.wait_for_selector("#subjects-table tr[data-subject='dog2']")
        page.screenshot(path=str(artifacts_dir / "dashboard-subjects.png"))
        page.goto(url + "#/apprentice")
        page.wait_for_selector("text=no apprentice or demonstration set given")
        page.screenshot(path=str(artifacts_dir / "dashboard-apprentice.png"))

        # subject detail: a loss curve with points, training photos and validation grids, no 404
        page.goto(url + "#/subject/dog1")
        page.wait_for_selector("svg.loss-curve polyline[data-series='loss_instance']")
        for series in ("loss", "loss_instance", "loss_prior"):
            assert int(page.get_attribute(f"svg.loss-curve polyline[data-series='{series}']", "data-points")) == 12
        assert page.locator("svg.loss-curve circle").count() == 36
        page.wait_for_function("() => [...document.querySelectorAll('#view img')].every(i => i.complete && i.naturalWidth > 0)")
        assert page.locator("#instance-images img").count() == 3 and page.locator("#validation-images img").count() == 2
        # the best-step chart: subject and prompt scores at steps 0 (the base), 4, 8 and 12, the chosen step marked
        chosen = Registry(reg_uri).expert_info("dog1").selection["chosen_step"]
        assert int(page.get_attribute("svg.selection-curve polyline[data-series='subject']", "data-points")) == 4
        assert int(page.get_attribute("svg.selection-curve line.chosen-step", "data-step")) == chosen
        assert f"chosen: step {chosen}" in page.inner_text("#selection")
        assert not errors, errors
        page.screenshot(path=str(artifacts_dir / "dashboard-subject.png"), full_page=True)

        # serving: the serving app with the dashboard deployed beside it at /dashboard
        port = free_port()
        scfg = ServeConfig(registry=reg_uri, port=port)
        start_serve("127.0.0.1", port)
        serve.run(build_app(scfg), name="dreamfleet", route_prefix="/", blocking=False)
        # the two lines `dreamfleet serve` runs to mount the dashboard
        serve.run(dashboard_for_serve(scfg), name="dashboard", route_prefix="/dashboard", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_ok(f"{base}/healthz")
        wait_ok(f"{base}/dashboard/api/runs")
        top = httpx.get(f"{base}/dashboard", follow_redirects=True)  # /dashboard redirects to /dashboard/
        assert top.url.path == "/dashboard/" and '<base href="/dashboard/">' in top.text, (top.url, top.text[:300])
        page.goto(f"{base}/dashboard/#/serving")
        page.wait_for_selector("#requests-ok")
        assert page.inner_text("#requests-ok") == "0"
        r = httpx.post(f"{base}/v1/generate", json={"subject": "dog1", "prompt": "a photo of {subject}", "steps": 2,
                                                    "seed": 1, "width": 64, "height": 64}, timeout=120)
        assert r.status_code == 200, r.text
        page.wait_for_function("() => document.querySelector('#requests-ok').textContent === '1'", timeout=20_000)
        page.wait_for_selector("#replicas-table .chips span")
        assert "dog1" in page.inner_text("#replicas-table")
        page.screenshot(path=str(artifacts_dir / "dashboard-serving.png"))
        # the mounted copy serves the other pages under its prefix too, images included
        page.goto(f"{base}/dashboard/#/subject/cat1")
        page.wait_for_function("() => [...document.querySelectorAll('#view img')].length > 0 && "
                               "[...document.querySelectorAll('#view img')].every(i => i.complete && i.naturalWidth > 0)")
        assert not errors, errors
        # the standalone dashboard reads the same numbers through --serve-url
        solo = build_dashboard_app(DashboardConfig(registry=reg_uri, serve_url=base))
        snap = TestClient(solo).get("/api/serving").json()
        assert snap["available"] and snap["requests_ok"] == 1 and snap["source"] == "v1/serving"
    finally:
        page.close()
        dash.should_exit = True
        serve.shutdown()


def wait_ok(url: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 within {timeout_s}s")


def test_subject_page_and_live_indicator_in_chromium(registry, browser, artifacts_dir):
    """No Ray here: the Ray link reads "not running". The loss curve is smoothed over the faint raw
    one; the last step's loss and the final mean are labelled apart. A 404 is not "offline"; a
    server that is gone is."""
    registry.update_state("dog1", loss=0.31)
    cfg = DashboardConfig(registry=registry.uri, poll_s=0.5, address=f"http://127.0.0.1:{free_port()}")
    dash = start_uvicorn(build_dashboard_app(cfg), free_port())
    url = f"http://127.0.0.1:{dash.config.port}/"
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    live = "() => document.querySelector('#live-text').textContent"
    try:
        page.goto(url + "#/subject/dog1")
        page.wait_for_selector("svg.loss-curve polyline[data-raw='loss']")
        page.wait_for_selector("#ray-off:not([hidden])")
        assert page.is_hidden("#ray-link") and page.inner_text("#ray-off") == "Ray dashboard: not running"
        smooth = "svg.loss-curve polyline[data-series='loss']"
        assert page.get_attribute(smooth, "points") != page.get_attribute("svg.loss-curve polyline[data-raw='loss']", "points")
        w = float(page.get_attribute(smooth, "data-smoothing"))
        expected, last = [], 0.0
        for i, v in enumerate([1.0, 0.5, 0.25]):  # TensorBoard's debiased moving average
            last = last * w + (1 - w) * v
            expected.append(last / (1 - w ** (i + 1)))
        assert page.evaluate("([v, w]) => ema(v, w)", [[1.0, 0.5, 0.25], w]) == pytest.approx(expected)
        facts = page.inner_text("#view")
        assert "Final loss (mean of the last 5 steps)" in facts and "Last step loss" in facts, facts
        page.screenshot(path=str(artifacts_dir / "dashboard-subject-smoothed.png"), full_page=True)
        page.goto(url + "#/subject/nobody")
        page.wait_for_selector("#error-message")
        assert "Not found" in page.inner_text("#error-message") and page.evaluate(live).startswith("live")
        time.sleep(1.2)  # a few more polls of the missing subject
        assert page.evaluate(live).startswith("live")
        page.goto(url + "#/apprentice")
        page.wait_for_selector("text=start the dashboard with --apprentices")
        dash.should_exit = True
        page.wait_for_function(f"() => ({live})() === 'offline'", timeout=20_000)
    finally:
        page.close()
        dash.should_exit = True


def test_apprentice_page_shows_apprentices_and_demo_sets_in_chromium(tmp_path, browser, artifacts_dir):
    """The files `dreamfleet apprentice train` and `gather` write, as the operator passes them."""
    from dreamfleet.core.apprentice import ApprenticeInfo

    app = tmp_path / "apprentice"
    app.mkdir()
    info = ApprenticeInfo(identifier="sks", base_model={"spec": "toy", "hash": "ab"}, arch={"grid": 4}, config={
        "learning_rate": 3e-3, "batch_size": 16, "photo_targets": 0.5, "train_unet": False}, code_version={},
        input_hash="cd", dataset={"uri": "/data/set", "subjects": 96, "targets": 471}, final_loss=0.0734,
        wall_time_s=402.0, created_at="2026-11-24T07:30:00+00:00", train_stats={"steps": 40})
    (app / "apprentice.json").write_text(json.dumps(info.to_dict()))
    (app / "loss_history.json").write_text(json.dumps([{"step": i + 1, "loss": 0.1 - i * 1e-3} for i in range(40)]))
    demo = tmp_path / "demo-set"
    demo.mkdir()
    (demo / "gather.json").write_text(json.dumps({"experts": 96, "generated": 1152, "kept": 471, "failed": {},
                                                  "kept_at_threshold": {"+0.05": 471, "+0.10": 284},
                                                  "config": {"threshold": 0.05}, "wall_time_s": 565.0}))
    cfg = DashboardConfig(registry=str(tmp_path / "reg"), apprentices=[str(app), str(tmp_path / "nothing")],
                          demo_sets=[str(demo)])
    c = client(Registry(tmp_path / "reg"), apprentices=cfg.apprentices, demo_sets=cfg.demo_sets)
    d = c.get("/api/apprentice").json()
    assert d["available"] and d["apprentices"][0]["identifier"] == "sks" and d["apprentices"][0]["steps"] == 40
    assert len(d["apprentices"][0]["curve"]["points"]) == 40
    assert "apprentice train" in d["apprentices"][1]["error"]  # a bad folder is listed, the others still shown
    assert d["demo_sets"][0]["kept"] == 471 and d["demo_sets"][0]["threshold"] == 0.05

    dash = start_uvicorn(build_dashboard_app(cfg), free_port())
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(f"http://127.0.0.1:{dash.config.port}/#/apprentice")
        page.wait_for_selector("#demo-sets-table td.num")
        assert "471" in page.inner_text("#demo-sets-table") and "+0.10: 284" in page.inner_text("#demo-sets-table")
        assert int(page.get_attribute("svg.loss-curve polyline[data-series='loss']", "data-points")) == 40
        assert "apprentice train" in page.inner_text("#view .panel.error")
        assert "photo_targets" in page.inner_text("#view")
        page.screenshot(path=str(artifacts_dir / "dashboard-apprentice-trained.png"))
    finally:
        page.close()
        dash.should_exit = True
