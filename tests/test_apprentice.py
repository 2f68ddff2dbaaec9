"""The apprentice (SuTI-style): gather, the filter, the model, its training and zero-shot serving."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import fast_config, free_port, picture, wait_healthy
from PIL import Image

from dreamfleet.core.apprentice import Apprentice, ApprenticeArch, ApprenticeInfo
from dreamfleet.core.models import load_base
from dreamfleet.data.demos import DemoSubject, Target, read_demo_set, write_demo_set
from dreamfleet.registry import Registry
from dreamfleet.toy.subjects import SUBJECTS, subject_images
from dreamfleet.trainers.apprentice import (
    ApprenticeConfig,
    ApprenticeObjective,
    prepare_apprentice,
    train_apprentice,
)
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject


def png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> Path:
    """Toy subjects: their photos as demonstrations, renders in other contexts as targets."""
    out = tmp_path_factory.mktemp("demo-set") / "set"
    subjects = [DemoSubject(s.subject_id, s.cls, subject_images(s, 4),
                            [Target(im, "a {0} {1}", {"prompt": "x"}) for im in subject_images(s, 4, stream=1)])
                for s in SUBJECTS[:4]]
    write_demo_set(subjects, out, builder={"kind": "test"})
    return out


@pytest.fixture(scope="module")
def apprentice_dir(demo_set, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("apprentice") / "app"
    train_apprentice(demo_set, "toy", ApprenticeConfig(steps=12, batch_size=4, lr_warmup_steps=0, checkpoint_every=0,
                                                       device="cpu"), out, progress=False)
    return out


def test_fresh_apprentice_generates_exactly_what_the_base_model_does():
    for spec in ("tiny-random", "toy"):
        app = Apprentice.fresh(load_base(spec), ApprenticeArch())
        base = load_base(spec)
        demos = subject_images(SUBJECTS[0], 3)
        got = app.generate(demos, ["a ball on the grass"] * 2, steps=4,
                           generators=[torch.Generator().manual_seed(i) for i in range(2)])
        want = base.pipeline()(["a ball on the grass"] * 2, num_inference_steps=4, guidance_scale=4.0,
                               generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(pixels(a), pixels(b)), spec


def test_demo_set_is_a_manifest_with_roles(demo_set):
    from dreamfleet.data.manifest import Manifest

    subjects, info = read_demo_set(demo_set)
    assert [s.subject_id for s in subjects] == sorted(s.subject_id for s in SUBJECTS[:4])
    assert all(len(s.demos) == 4 and len(s.targets) == 4 for s in subjects)
    m = Manifest.open(demo_set)
    roles = [meta["role"] for _, _, meta in m.read_images(subjects[0].subject_id)]
    assert roles == ["demo"] * 4 + ["target"] * 4
    assert info["content_hash"]


def test_apprentice_loss_falls_and_round_trips(demo_set, tmp_path):
    c = ApprenticeConfig(steps=40, batch_size=8, learning_rate=1e-3, lr_warmup_steps=0, checkpoint_every=20,
                         drop_text=0.0, drop_demos=0.0, drop_both=0.0, device="cpu")
    p = prepare_apprentice(demo_set, "toy", c)
    objective = ApprenticeObjective(p)

    def held_out_loss() -> float:  # the same batches (steps 10_000..10_003) before and after
        with torch.no_grad():
            return sum(float(objective.loss(10_000 + i, 0)[0]) for i in range(4)) / 4

    before = held_out_loss()
    from dreamfleet.trainers.apprentice import apprentice_loop_settings
    from dreamfleet.trainers.loop import run_loop

    result = run_loop(objective, apprentice_loop_settings(p, progress=False), checkpoint_dir=tmp_path / "ckpt")
    after = held_out_loss()
    assert after < 0.9 * before, (before, after)
    assert result.final_step == 40

    from dreamfleet.trainers.apprentice import publish_apprentice

    publish_apprentice(p, result, tmp_path / "app", wall_time_s=1.0)
    info = ApprenticeInfo.read(tmp_path / "app")
    assert info.input_hash and info.config["steps"] == 40 and info.code_version
    loaded = Apprentice.load(tmp_path / "app")
    demos = subject_images(SUBJECTS[1], 3)
    g = [torch.Generator().manual_seed(3)]
    p.base.unet.eval()
    a = Apprentice(p.base, info, ApprenticeArch(**info.arch)).generate(demos, [f"a {info.identifier} ball"], steps=3, generators=g)
    b = loaded.generate(demos, [f"a {info.identifier} ball"], steps=3, generators=[torch.Generator().manual_seed(3)])
    assert np.abs(pixels(a[0]) - pixels(b[0])).max() <= 1  # same weights after save/load


def test_photo_targets_are_a_subjects_photo_conditioned_on_its_other_photos(demo_set):
    c = ApprenticeConfig(steps=1, batch_size=12, photo_targets=1.0, min_demos=3, max_demos=3, drop_text=0.0,
                         drop_demos=0.0, drop_both=0.0, device="cpu")
    p = prepare_apprentice(demo_set, "toy", c)
    latents, _noisy, _t, text, demos, _noise = ApprenticeObjective(p).batch(0, 0)
    seen = set()
    for i in range(len(latents)):
        owners = {(s, j) for row in demos[i] for s, pool in enumerate(p.demo_latents) for j in range(len(pool))
                  if torch.equal(row, pool[j])}
        subjects = {s for s, _ in owners}
        assert len(subjects) == 1 and len(owners) == 3  # three different photos of one subject
        s = subjects.pop()
        (target,) = set(range(4)) - {j for _, j in owners}  # the fourth photo is the target, not a demonstration
        dist = [float((latents[i] - m).norm()) for m in p.photo_mean[s]]
        assert min(range(4), key=dist.__getitem__) == target
        assert torch.equal(text[i], p.photo_emb[s][target])
        seen.add(s)
    assert len(seen) > 1


def test_gather_filters_by_fidelity_gain_and_writes_shards(ray_local, tmp_path):
    from dreamfleet.control.gather import GatherConfig, gather
    from dreamfleet.data.manifest import Manifest

    reg = Registry(tmp_path / "reg")
    cache = ClassImageCache(tmp_path / "cache")
    for k, sid in enumerate(("ga", "gb")):
        subject = SubjectData(sid, "ball", [picture(k * 10 + i) for i in range(3)])
        cfg = fast_config(steps=4, learning_rate=5e-2, method="lora", seed=k, with_prior_preservation=False)
        reg.publish(sid, train_subject(subject, "tiny-random", cfg, tmp_path / "experts" / sid,
                                       class_cache=cache, progress=False).expert_dir)
    c = GatherConfig(templates=["a {0} {1}", "a {0} {1} on the beach"], images_per_prompt=2, threshold=0.0,
                     num_inference_steps=2)
    report = gather(str(tmp_path / "reg"), tmp_path / "set", c)
    rows = pq.read_table(tmp_path / "set" / "triples.parquet").to_pylist()
    assert report.generated == len(rows) == 2 * 2 * 2
    above = {(r["subject_id"], r["template"], r["seed"]) for r in rows if r["gain"] >= 0.0}
    assert {(r["subject_id"], r["template"], r["seed"]) for r in rows if r["kept"]} == above
    assert report.kept == len(above)
    for r in rows:
        assert r["gain"] == pytest.approx(r["expert_score"] - r["base_score"])
    if above:  # the shards hold exactly the kept renders, each with its subject's photos
        m = Manifest.open(tmp_path / "set")
        kept = set()
        for sid in m.subject_ids():
            metas = [meta for _, _, meta in m.read_images(sid)]
            assert sum(x["role"] == "demo" for x in metas) == 3
            kept |= {(sid, x["template"], x["seed"]) for x in metas if x["role"] == "target"}
        assert kept == above
    # The filter is exactly the threshold: the same renders at a threshold between two gains.
    gains = sorted(r["gain"] for r in rows)
    mid = (gains[3] + gains[4]) / 2
    from dreamfleet.control.gather import ExpertRenderer
    from dreamfleet.core.config import to_dict

    renderer = ExpertRenderer(to_dict(GatherConfig(**{**to_dict(c), "threshold": mid})), str(tmp_path / "reg"))
    again = renderer.render_expert("ga", "v0001") + renderer.render_expert("gb", "v0001")
    assert sum(r["kept"] for r in again) == 4
    assert all(r["kept"] == (r["gain"] >= mid) for r in again)


def test_apprentice_trains_on_ray_train(ray_local, demo_set, tmp_path):
    from dreamfleet.control.apprentice import ApprenticeRuntime, train

    c = ApprenticeConfig(steps=6, batch_size=2, lr_warmup_steps=0, checkpoint_every=3, device="cpu")
    info = train(demo_set, "toy", c, tmp_path / "app", ApprenticeRuntime(workers=1))
    assert info.train_stats["steps"] == 6 and info.train_stats["world_size"] == 1
    assert (tmp_path / "app" / "apprentice.safetensors").is_file()


def test_cli_generate_from_demonstrations(apprentice_dir, tmp_path):
    from dreamfleet.cli.main import main

    demos = []
    for i, im in enumerate(subject_images(SUBJECTS[2], 3)):
        demos.append(tmp_path / f"d{i}.png")
        im.save(demos[-1])
    assert main(["generate", "--demos", *map(str, demos), "--apprentice", str(apprentice_dir), "--prompt",
                 "a [V] ball in the snow", "-n", "2", "--steps", "3", "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("0*.png"))) == 2
    assert main(["generate", "--demos", str(demos[0]), "--prompt", "x", "--out", str(tmp_path / "g2")]) == 2


# --------------------------------------------------------------------------- serving


@pytest.fixture(scope="module")
def server(ray_local, apprentice_dir, tmp_path_factory):
    from ray import serve

    from dreamfleet.serving.app import build_app, start_serve
    from dreamfleet.serving.auth import KeyStore
    from dreamfleet.serving.config import ServeConfig

    tmp = tmp_path_factory.mktemp("serve-apprentice")
    reg = Registry(tmp / "reg")
    subject = SubjectData("alpha", "ball", [picture(i) for i in range(3)])
    expert = train_subject(subject, "tiny-random", fast_config(steps=3, method="lora", with_prior_preservation=False),
                           tmp / "experts" / "alpha", progress=False).expert_dir
    reg.publish("alpha", expert)
    token = KeyStore(tmp / "reg" / "serving" / "keys.json").create("acme")[1]
    cfg = ServeConfig(registry=str(tmp / "reg"), port=free_port(), apprentice=str(apprentice_dir), min_side=32,
                      max_demo_bytes=20_000, max_demo_side=256)
    try:  # a fixture that fails half-way must not leave its Serve to the next module
        start_serve("127.0.0.1", cfg.port)
        serve.run(build_app(cfg), name="dreamfleet", route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{cfg.port}"
        wait_healthy(url, 120)
        yield {"url": url, "token": token}
    finally:
        serve.shutdown()


def _post(server, body, token=None):
    headers = {"Authorization": f"Bearer {token or server['token']}"}
    return httpx.post(server["url"] + "/v1/generate", json=body, headers=headers, timeout=120)


def test_demonstrations_route_over_http(server, apprentice_dir):
    demos = [png_b64(im) for im in subject_images(SUBJECTS[0], 3)]
    body = {"demonstrations": demos, "prompt": "a [V] ball on the beach", "num_images": 2, "steps": 3, "seed": 5}
    r = _post(server, body)
    assert r.status_code == 200, r.text
    got = r.json()
    info = ApprenticeInfo.read(apprentice_dir)
    assert got["prompt"] == f"a {info.identifier} ball on the beach" and got["demonstrations"] == 3
    assert len(got["images"]) == 2
    assert Image.open(io.BytesIO(base64.b64decode(got["images"][0]))).size == (32, 32)
    # the same request through the library gives the same first image
    app = Apprentice.load(apprentice_dir)
    ref = app.generate(subject_images(SUBJECTS[0], 3), [got["prompt"]], steps=3, guidance_scale=7.5,
                       generators=[torch.Generator().manual_seed(5)])[0]
    served = Image.open(io.BytesIO(base64.b64decode(got["images"][0]))).convert("RGB")
    assert np.abs(pixels(served) - pixels(ref)).max() <= 1
    # a subject with an expert is still served by its expert
    r = _post(server, {"subject": "alpha", "prompt": "a [V] ball", "steps": 2, "width": 32, "height": 32})
    assert r.status_code == 200, r.text and r.json()["subject"] == "alpha"
    assert httpx.post(server["url"] + "/v1/generate", json=body).status_code == 401


@pytest.mark.parametrize("case", ["none", "nine", "not_image", "not_base64", "oversized", "too_wide", "both"])
def test_bad_demonstrations_answer_422(server, case):
    good = png_b64(subject_images(SUBJECTS[0], 1)[0])
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    demos = {"none": [], "nine": [good] * 9, "not_image": [good, base64.b64encode(b"hello, not a png").decode()],
             "not_base64": [good, "%%%"], "oversized": [good, png_b64(noise)],
             "too_wide": [good, png_b64(Image.new("RGB", (300, 40), "red"))], "both": [good]}[case]
    body = {"demonstrations": demos, "prompt": "a [V] ball", "steps": 2}
    if case == "both":
        body["subject"] = "alpha"
    r = _post(server, body)
    assert r.status_code == 422, r.text
    locs = [d["loc"] for d in r.json()["detail"]]
    if case in ("none", "nine"):
        assert any("demonstrations" in loc for loc in locs), locs
    elif case != "both":
        assert ["body", "demonstrations", 1] in locs, locs


# ~90 s; `make test` covers its two halves: the apprentice worker on Ray Train
# (test_apprentice_trains_on_ray_train) and the DeepSpeed ZeRO-2 engine around the one loop
# (test_fanout.py's ZeRO-2 group). This end-to-end run of both is `make test-slow`'s.
@pytest.mark.slow
def test_apprentice_trains_with_deepspeed_zero2_on_two_workers(ray_local, demo_set, tmp_path):
    from dreamfleet.control.apprentice import ApprenticeRuntime, train

    c = ApprenticeConfig(steps=4, batch_size=2, lr_warmup_steps=0, checkpoint_every=2, device="cpu")
    info = train(demo_set, "toy", c, tmp_path / "app", ApprenticeRuntime(workers=2, zero_stage=2))
    assert info.train_stats["world_size"] == 2 and info.train_stats["zero_stage"] == 2
    assert info.train_stats["steps"] == 4
    loaded = Apprentice.load(tmp_path / "app")  # the weights DeepSpeed trained load back
    fresh = Apprentice.fresh(load_base("toy"))
    trained_v = [v for k, v in loaded.base.unet.state_dict().items() if "to_v_ip" in k]
    fresh_v = [v for k, v in fresh.base.unet.state_dict().items() if "to_v_ip" in k]
    assert any(not torch.equal(a, b) for a, b in zip(trained_v, fresh_v, strict=True))
