"""One expert loader (core.expert) for serving, eval and gather: everything an expert folder
holds is applied, so a full expert trained with --train-text-encoder renders as a plain
diffusers pipeline with both trained components does. (Through the HTTP app: test_serving.py.)

Images are 8-bit: the same float computation gives the same pixels; a reduction-order
difference can move a pixel by one level, never more at these sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import fast_config, picture, pipeline_images, plain_pipeline
from PIL import Image

from dreamfleet.core.expert import ExpertInfo, open_expert, read_expert
from dreamfleet.core.models import load_base
from dreamfleet.registry import Registry
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject


@pytest.fixture(scope="module")
def expert(tmp_path_factory):
    """A full-weight expert whose text encoder was trained too, published to a registry."""
    root = tmp_path_factory.mktemp("te-expert")
    subject = SubjectData("tex", "ball", [picture(90 + i) for i in range(3)])
    cfg = fast_config(steps=6, method="full", train_text_encoder=True, learning_rate=5e-3, seed=0,
                      with_prior_preservation=False)
    result = train_subject(subject, "tiny-random", cfg, root / "expert", class_cache=ClassImageCache(root / "cache"),
                           progress=False)
    reg = Registry(root / "reg")
    reg.publish("tex", result.expert_dir)
    return {"dir": result.expert_dir, "reg": reg, "root": root, "info": ExpertInfo.read(result.expert_dir)}


def test_the_loader_reads_every_component(expert):
    base = load_base("tiny-random")
    weights = read_expert(expert["dir"], base)
    assert weights.unet is not None and weights.text_encoder is not None and weights.lora is None
    trained = dict(weights.text_encoder.named_parameters())
    moved = [n for n, p in base.text_encoder.named_parameters() if not np.allclose(p.detach(), trained[n].detach())]
    assert moved  # the text encoder really was trained, so leaving it out would show


def test_eval_renders_what_plain_diffusers_renders(expert):
    prompt = expert["info"].instance_prompt
    plain = plain_pipeline(expert["dir"], expert["root"])
    want = pipeline_images(plain, [prompt], [3], steps=2)[0]
    pipe, _ = open_expert(expert["dir"])  # what `dreamfleet eval` and the demo load
    got = pipeline_images(pipe, [prompt], [3], steps=2)[0]
    assert np.abs(got - want).max() <= 1
    plain.text_encoder = load_base("tiny-random").text_encoder  # the old loaders' output: UNet only
    without = pipeline_images(plain, [prompt], [3], steps=2)[0]
    assert np.abs(without - want).mean() > 1.0  # the trained text encoder changes the image


def test_gather_renders_what_plain_diffusers_renders(expert):
    from dreamfleet.control.gather import ExpertRenderer, GatherConfig
    from dreamfleet.core.config import to_dict

    # the toy judge scores toy classes: a ball
    c = GatherConfig(templates=["a {0} {1}"], images_per_prompt=2, threshold=0.0, num_inference_steps=2)
    rows = ExpertRenderer(to_dict(c), str(expert["reg"].uri)).render_expert("tex", "v0001")
    assert [r["error"] for r in rows] == ["", ""]
    plain = plain_pipeline(expert["dir"], expert["root"])
    info = expert["info"]
    want = pipeline_images(plain, [f"a {info.identifier} ball"] * 2, [c.seed, c.seed + 1], steps=2,
                           guidance=c.guidance_scale)
    for row, ref in zip(rows, want, strict=True):
        got = np.asarray(Image.open(io.BytesIO(row["target_png"])).convert("RGB"), dtype=np.int16)
        assert np.abs(got - ref).max() <= 1, row["prompt"]


def test_the_engine_loads_an_active_expert_once(expert):
    """A replica loads the expert through multiplexing, then ``generate`` asks for it again: that
    second ask is a use, not a load (no host-cache load counted, no swap time)."""
    from dreamfleet.serving.engine import ExpertEngine, GenItem

    engine = ExpertEngine(str(expert["reg"].uri))
    engine.load("tex", "v0001")
    engine.generate("tex", "v0001", [GenItem(expert["info"].instance_prompt, 1, 1, 7.5, 0, 64, 64)])
    stats = engine.stats
    assert (stats.loads_disk, stats.loads_host, len(stats.swap_s), stats.generations) == (1, 0, 1, 1)
    engine.evict("tex", "v0001")
    engine.load("tex", "v0001")  # back from the host cache: a real load again
    assert (stats.loads_disk, stats.loads_host, len(stats.swap_s), stats.evictions) == (1, 1, 2, 1)
