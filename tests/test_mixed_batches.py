"""Mixed-subject batches and bounded work in the serving engine, without Ray.

One denoiser pass serves requests for different LoRA experts, each image through its own
expert's adapter (``core.multilora.LoRABank``): the images are those of serving each request
alone at the same seed. A request's ticket stops its pass between denoising steps.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import fast_config, picture, pipeline_images, stock_pipeline

from dreamfleet.registry import Registry
from dreamfleet.serving.engine import Cancelled, ExpertEngine, GenItem, Job, Ticket
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject


def _train(tmp: Path, sid: str, seed: int, **kw) -> Path:
    subject = SubjectData(sid, "dog", [picture(seed * 10 + i) for i in range(3)])
    cfg = fast_config(steps=4, learning_rate=5e-2, seed=seed, **kw)
    return train_subject(subject, "tiny-random", cfg, tmp / "experts" / sid,
                         class_cache=ClassImageCache(tmp / "cache"), progress=False).expert_dir


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    reg = Registry(tmp / "reg")
    experts = {"a": _train(tmp, "a", 1), "b": _train(tmp, "b", 2, lora_rank=8),
               "te": _train(tmp, "te", 3, train_text_encoder=True), "te2": _train(tmp, "te2", 4, train_text_encoder=True)}
    for sid, folder in experts.items():
        reg.publish(sid, folder)
    return {"reg": reg, "experts": experts, "tmp": tmp}


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in images]


def item(seed: int, n: int = 1, steps: int = 3) -> GenItem:
    return GenItem("a photo of sks dog", n, steps, 7.5, seed, 32, 32)


def test_one_pass_serves_different_experts_as_each_alone(registry):
    """a (rank 4), b (rank 8) and a again in one pass: each image is the image of its request
    served alone, and of the stock diffusers pipeline with ``load_lora_weights``."""
    engine = ExpertEngine(str(registry["reg"].uri), device="cpu")
    jobs = [Job("a", "v0001", item(0)), Job("b", "v0001", item(1, n=2)), Job("a", "v0001", item(5))]
    mixed = engine.generate_jobs(jobs)
    assert engine.stats.mixed_passes == 1 and engine.stats.generations == 1
    for job, got in zip(jobs, mixed, strict=True):
        alone = engine.generate(job.subject_id, job.version, [job.item])[0]
        diff = max(np.abs(x - y).max() for x, y in zip(pixels(got), pixels(alone), strict=True))
        assert diff <= 1, (job.subject_id, diff)
    for sid, got in (("a", mixed[0]), ("b", mixed[1])):
        stock = stock_pipeline(registry["experts"][sid], registry["tmp"])
        seeds = [jobs[0 if sid == "a" else 1].item.seed + j for j in range(len(got))]
        want = pipeline_images(stock, ["a photo of sks dog"] * len(got), seeds, 3, size=32)
        assert max(np.abs(x - y).max() for x, y in zip(pixels(got), want, strict=True)) <= 1
    assert np.abs(pixels(mixed[0])[0] - pixels(mixed[1])[0]).mean() > 2  # the experts really differ


def test_text_encoder_experts_get_their_own_pass(registry):
    """An expert with a text-encoder LoRA needs its own prompt encoding: its requests are not
    mixed, and still come out as served alone."""
    engine = ExpertEngine(str(registry["reg"].uri), device="cpu")
    jobs = [Job("te", "v0001", item(0)), Job("a", "v0001", item(0))]
    mixed = engine.generate_jobs(jobs)
    assert engine.stats.generations == 2 and engine.stats.mixed_passes == 0
    alone = engine.generate("te", "v0001", [item(0)])[0]
    assert np.abs(pixels(mixed[0])[0] - pixels(alone)[0]).max() <= 1


def test_dead_requests_are_dropped_and_a_dead_pass_stops_between_steps(registry):
    engine = ExpertEngine(str(registry["reg"].uri), device="cpu")
    expired = Ticket(deadline=time.time() - 1)
    out = engine.generate_jobs([Job("a", "v0001", item(0), expired), Job("b", "v0001", item(1))])
    assert isinstance(out[0], Cancelled) and isinstance(out[1], list)

    t0 = time.perf_counter()
    engine.generate("a", "v0001", [item(0, steps=40)])
    full = time.perf_counter() - t0
    ticket = Ticket()
    threading.Timer(full / 8, ticket.cancelled.set).start()
    t0 = time.perf_counter()
    (result,) = engine.generate_jobs([Job("a", "v0001", item(0, steps=40), ticket)])
    assert isinstance(result, Cancelled) and time.perf_counter() - t0 < full / 2
    assert engine.generate("a", "v0001", [item(0)])[0]  # the engine serves on


def test_eviction_during_a_pass_waits_for_the_pass(registry):
    """The multiplexing LRU may drop an expert while a pass renders it: it leaves after the pass."""
    engine = ExpertEngine(str(registry["reg"].uri), device="cpu")
    engine.load("a", "v0001")
    evicted_mid_pass = []

    def evict_then_check(pipe, step, timestep, kwargs):
        engine.evict("a", "v0001")
        evicted_mid_pass.append(("a", "v0001") in engine.active)
        return kwargs

    engine._stop_when_dead = lambda tickets: evict_then_check  # hook the step callback
    engine.generate("a", "v0001", [item(0)])
    assert evicted_mid_pass and all(evicted_mid_pass)
    assert ("a", "v0001") not in engine.active and engine.stats.evictions == 1


def test_the_device_holds_at_most_max_active_peft_or_full_experts(registry):
    """PEFT adapters and full fine-tunes are bounded on the device (least recently used leave);
    plain LoRA experts live in the bank and do not count."""
    engine = ExpertEngine(str(registry["reg"].uri), device="cpu", max_active=1)
    for sid in ("a", "b", "te", "te2"):
        engine.load(sid, "v0001")
    assert engine.active == {("a", "v0001"): "bank", ("b", "v0001"): "bank", ("te2", "v0001"): engine.active[("te2", "v0001")]}
    jobs = [Job("te", "v0001", item(0)), Job("te2", "v0001", item(0)), Job("a", "v0001", item(0))]
    out = engine.generate_jobs(jobs)  # both PEFT experts in one call: neither leaves mid-call
    assert all(isinstance(r, list) for r in out)
    alone = engine.generate("te", "v0001", [item(0)])[0]
    assert np.abs(pixels(out[0])[0] - pixels(alone)[0]).max() <= 1
    assert sum(what != "bank" for what in engine.active.values()) == 1
