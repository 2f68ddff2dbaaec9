"""The fan-out on a local CPU Ray: ZeRO-2/3 worker groups, failures, resume, restart.

A driver killed mid-run and submitted again is tested on a real head in test_jobs.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_within_noise,
    curve_gap,
    curve_spread,
    fast_config,
    manifest_with_a_broken_subject,
    prefilled_class_cache,
    torch_threads,
    weight_gap,
)

from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
from dreamfleet.data.manifest import Manifest
from dreamfleet.registry import Registry

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return manifest_with_a_broken_subject(tmp_path_factory.mktemp("fanout"))


def cfg(**kw):
    return fast_config(checkpoint_every=4, **kw)


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory) -> str:
    """The dog and cat images of ``cfg()``, for the fan-outs that are not about class images.
    The ZeRO-2 test keeps a cache of its own and counts what a fan-out generates from nothing."""
    return prefilled_class_cache(tmp_path_factory.mktemp("class-images"), cfg())


def fan_out_past_a_broken_subject_and_again(manifest: str, reg_uri: str, train, fan: FanoutConfig) -> Registry:
    """The fan-out on two workers per subject: the broken subject fails alone (not retried), the
    class images are generated once per class, and a driver restart (the same command again)
    skips the finished subjects."""
    summary = run_fanout(manifest, reg_uri, "tiny-random", train, fan, progress=False)
    assert sorted(summary.done) == ["cat1", "dog1", "dog2"]
    assert list(summary.failed) == ["broken"] and "broken" in summary.failed["broken"]
    assert "hash" in summary.failed["broken"]
    reg = Registry(reg_uri)
    st = reg.get_state("broken")
    assert st.state == "failed" and st.attempts == 1  # data errors are not retried
    for sid in summary.done:
        info = reg.expert_info(sid)
        assert info.train_stats["world_size"] == 2 and info.train_stats["zero_stage"] == fan.zero_stage
        assert reg.get_state(sid).state == "done" and reg.latest(sid) == "v0001"
    assert summary.class_images_generated == 8  # 4 dog + 4 cat, once per class
    run = reg.run(summary.run_id)
    assert run["state"] == "finished" and run["failed"] == {"broken": summary.failed["broken"]}

    again = run_fanout(manifest, reg_uri, "tiny-random", train, fan, subjects=["dog1", "cat1"], progress=False)
    assert sorted(again.skipped) == ["cat1", "dog1"] and again.done == []
    assert reg.versions("dog1") == ["v0001"]
    return reg


@pytest.mark.slow  # ~130 s alone; the ZeRO-3 test below runs the same fan-out (two workers each, a broken
# subject, a driver restart) in `make test`
def test_zero2_two_workers_each_and_a_broken_subject_fails_alone(manifest, tmp_path):
    fan_out_past_a_broken_subject_and_again(manifest, str(tmp_path / "reg"), cfg(steps=8),
                                            FanoutConfig(workers_per_subject=2, zero_stage=2))


def test_zero3_two_workers_each_a_broken_subject_fails_alone_and_the_expert_loads_into_plain_diffusers(
        manifest, tmp_path):
    """Full fine-tuning under DeepSpeed ZeRO-3 on worker groups of two, past a broken subject and
    again; the published UNet is consolidated (not ZeRO-3 shards) and renders in stock diffusers."""
    reg = fan_out_past_a_broken_subject_and_again(manifest, str(tmp_path / "reg"), cfg(steps=4, method="full"),
                                                  FanoutConfig(workers_per_subject=2, zero_stage=3))
    assert_renders_in_plain_diffusers(reg.fetch("dog1"), tmp_path)


def assert_renders_in_plain_diffusers(expert: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dreamfleet.core.models import load_base

    base = load_base("tiny-random")
    base.save_pretrained(tmp_path / "sd")
    unet = UNet2DConditionModel.from_pretrained(expert / "unet")
    full = dict(unet.state_dict())
    assert all(v.numel() > 0 for v in full.values())  # consolidated, not ZeRO-3 shards
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", unet=unet, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    tuned = pipe("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    pipe.unet = base.unet
    plain = pipe("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(tuned - plain).max() > 1e-4


@pytest.mark.slow  # ~115 s; test_multinode.py's lost-node test (in `make test`) resumes a subject from its checkpoint
def test_killed_worker_resumes_from_checkpoint(manifest, tmp_path):
    reg_uri = str(tmp_path / "reg")
    reg = Registry(reg_uri)
    steps = 160  # long enough to kill it between a checkpoint and the end (a step is ~0.1 s here)
    train_cfg = fast_config(steps=steps, checkpoint_every=20, with_prior_preservation=False)
    result: dict = {}

    def run():
        result["summary"] = run_fanout(manifest, reg_uri, "tiny-random", train_cfg,
                                       FanoutConfig(workers_per_subject=2, zero_stage=0, max_retries=2),
                                       subjects=["cat1"], progress=False)

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive():
        st = reg.get_state("cat1")
        if st and st.state == "training" and (st.checkpoint_step or 0) >= 20 and st.step < steps - 60:
            killed = st.worker["pids"][1]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    assert killed is not None, "never saw a checkpoint of the running subject"
    thread.join(600)
    summary = result["summary"]
    assert summary.done == ["cat1"], summary.failed
    info = reg.expert_info("cat1")
    assert info.train_stats["attempt"] == 2
    assert info.train_stats["resumed_from"] is not None and info.train_stats["resumed_from"] >= 20
    # not retrained from step 0: the steps executed in both attempts add up to far less than twice the run
    assert info.train_stats["steps_executed"] < 2 * steps - 20
    assert len(info.train_stats) and Path(reg.fetch("cat1")).is_dir()


@pytest.mark.slow  # ~100 s; the registry's own two-writer test (test_registry.py) is in `make test`
def test_two_orchestrators_on_one_registry(manifest, tmp_path):
    """Two fan-out drivers at once, overlapping on one subject, publishing into one registry."""
    reg_uri = str(tmp_path / "reg")
    results: dict[str, object] = {}

    def run(name: str, subjects: list[str]) -> None:
        try:
            results[name] = run_fanout(manifest, reg_uri, "tiny-random", cfg(steps=4, with_prior_preservation=False),
                                       FanoutConfig(), subjects=subjects, progress=False)
        except Exception as e:  # surfaced by the assertions below
            results[name] = e

    threads = [threading.Thread(target=run, args=("a", ["dog1", "cat1"])),
               threading.Thread(target=run, args=("b", ["cat1", "dog2"]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    a, b = results["a"], results["b"]
    assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
    assert a.run_id != b.run_id and not a.failed and not b.failed
    reg = Registry(reg_uri)
    trained_twice = "cat1" in a.done and "cat1" in b.done
    assert reg.versions("cat1") == (["v0001", "v0002"] if trained_twice else ["v0001"])
    for sid in ("dog1", "cat1", "dog2"):
        assert reg.get_state(sid).state == "done"
        assert reg.latest(sid) in reg.versions(sid)
        reg.expert_info(sid)  # every published version is complete and readable
    assert {r["run_id"] for r in reg.runs()} == {a.run_id, b.run_id}
    assert not list(Path(reg_uri).rglob("*.tmp*"))


def _solo_in_process(manifest: str, sid: str, train_cfg, class_cache: Path, out: Path, threads: int):
    """What train-subject publishes for one manifest subject, at the given torch thread count."""
    from dreamfleet.trainers.class_images import ClassImageCache
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject

    m = Manifest.open(manifest)
    rec = m.record(sid)
    subject = SubjectData(sid, rec.class_noun, [im for _, im, _ in m.read_images(sid)], identifier=rec.identifier)
    with torch_threads(threads):
        return train_subject(subject, "tiny-random", train_cfg, out, class_cache=ClassImageCache(class_cache),
                             progress=False)


def test_packed_fanout_trains_subjects_together_as_they_train_alone(manifest, tmp_path, class_cache):
    """--pack: a worker leases several subjects and trains their LoRA adapters in one packed run;
    the broken subject fails alone, and each packed expert is the one its solo run publishes."""
    from safetensors.torch import load_file

    reg_uri = str(tmp_path / "packed")
    summary = run_fanout(manifest, reg_uri, "tiny-random", cfg(steps=6), FanoutConfig(pack=4, class_cache=class_cache),
                         progress=False)
    assert summary.class_images_generated == 0  # all found in the cache
    assert sorted(summary.done) == ["cat1", "dog1", "dog2"]
    assert list(summary.failed) == ["broken"] and "hash" in summary.failed["broken"]
    reg = Registry(reg_uri)
    for sid in summary.done:
        info = reg.expert_info(sid)
        assert sorted(info.train_stats["packed"]["subjects"]) == ["cat1", "dog1", "dog2"]
        assert reg.get_state(sid).state == "done" and reg.get_state(sid).step == 6
    # The solo runs of dog2, in process (test_packing.py runs the solo and packed trainers
    # side by side; here the question is whether the fan-out packs what it was given), on the
    # same class images as the fan-out, at 1 and 2 threads: their spread is the float noise
    # the packed expert is judged against (helpers.NOISE_MARGIN).
    weights = "pytorch_lora_weights.safetensors"
    solo = [_solo_in_process(manifest, "dog2", cfg(steps=6), Path(class_cache), tmp_path / f"solo{n}", n)
            for n in (1, 2)]
    a_info, b_info = solo[0].info, reg.expert_info("dog2")
    assert "packed" not in a_info.train_stats and a_info.config == b_info.config
    loss_noise = {"loss": curve_spread([solo[0].info.final_loss], [solo[1].info.final_loss])}
    assert_within_noise({"loss": curve_gap([a_info.final_loss], [b_info.final_loss])}, loss_noise,
                        "packed fan-out dog2's final loss vs its solo run")
    wa, wb = (load_file(str(Path(d) / weights)) for d in (solo[0].expert_dir, reg.fetch("dog2")))
    noise = weight_gap(wa, load_file(str(solo[1].expert_dir / weights)))
    assert_within_noise(weight_gap(wa, wb), noise, "packed fan-out expert dog2 vs its solo run")


def test_pack_needs_lora_and_one_worker(manifest, tmp_path):
    from dreamfleet.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--pack"):
        FanoutConfig(pack=2, workers_per_subject=2)
    with pytest.raises(ConfigError, match="method='full'"):
        run_fanout(manifest, str(tmp_path / "r"), "tiny-random", cfg(method="full"), FanoutConfig(pack=2),
                   progress=False)


# Flux under ZeRO-3 in `make test` (~70 s); SDXL and Z-Image under ZeRO-2 and SD3 under DDP in `make test-slow`.
@pytest.mark.parametrize(("spec", "zero_stage"), [pytest.param("tiny-sdxl", 2, marks=pytest.mark.slow),
                                                  pytest.param("tiny-sd3", 0, marks=pytest.mark.slow),
                                                  pytest.param("tiny-zimage", 2, marks=pytest.mark.slow),
                                                  ("tiny-flux", 3)])
def test_every_family_fans_out_on_two_workers(manifest, tmp_path, spec, zero_stage):
    """Each newer family through the fan-out: two workers per subject (DDP, or DeepSpeed ZeRO-2/3,
    one family each), published as a LoRA expert whose adapter is complete (not a ZeRO-3 shard)."""
    from safetensors.torch import load_file

    from dreamfleet.core.expert import ExpertInfo

    reg_uri = str(tmp_path / "reg")
    summary = run_fanout(manifest, reg_uri, spec, cfg(steps=4, with_prior_preservation=False),
                         FanoutConfig(workers_per_subject=2, zero_stage=zero_stage), subjects=["dog1"], progress=False)
    assert summary.done == ["dog1"], summary
    expert = Registry(reg_uri).fetch("dog1")
    info = ExpertInfo.read(expert)
    assert info.base_model["family"] == spec.removeprefix("tiny-")
    assert info.train_stats["world_size"] == 2 and info.train_stats["zero_stage"] == zero_stage
    lora = load_file(str(expert / "pytorch_lora_weights.safetensors"))
    assert lora and all(v.numel() > 0 for v in lora.values())
    assert Registry(reg_uri).run(summary.run_id)["base_family"] == info.base_model["family"]
