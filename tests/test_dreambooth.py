"""The DreamBooth trainer on the tiny-random model: loss, cache, LoRA export, resume, artifact."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch
from helpers import assert_within_noise, curve_gap, curve_spread, fast_config, picture, torch_threads
from safetensors.torch import load_file

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import ExpertInfo
from dreamfleet.core.models import load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData, work_dir_for
from dreamfleet.trainers.fit import train_subject


def subject(name="dog1", cls="dog", seed=0, n=4, **kw):
    return SubjectData(name, cls, [picture(seed * 10 + i) for i in range(n)], **kw)


@pytest.fixture
def cache(tmp_path):
    return ClassImageCache(tmp_path / "class-cache")


def test_loss_falls_full_finetune(tmp_path, cache):
    cfg = fast_config(steps=40, method="full", learning_rate=1e-3)
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    inst = [h["loss_instance"] for h in r.loop.history]
    assert statistics.mean(inst[-8:]) < 0.6 * statistics.mean(inst[:8])
    prior = [h["loss_prior"] for h in r.loop.history]
    assert all(np.isfinite(prior)) and statistics.mean(prior[-8:]) < statistics.mean(prior[:8])


def test_loss_falls_lora(tmp_path, cache):
    cfg = fast_config(steps=40, method="lora", learning_rate=1e-2)
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    inst = [h["loss_instance"] for h in r.loop.history]
    assert statistics.mean(inst[-8:]) < 0.9 * statistics.mean(inst[:8])


def test_class_images_reused_by_second_subject_of_same_class(tmp_path, cache):
    cfg = fast_config(steps=1)
    first = train_subject(subject("dog1"), "tiny-random", cfg, tmp_path / "dog1", class_cache=cache, progress=False)
    second = train_subject(subject("dog2", seed=1), "tiny-random", cfg, tmp_path / "dog2", class_cache=cache, progress=False)
    cat = train_subject(subject("cat1", "cat", seed=2), "tiny-random", cfg, tmp_path / "cat1", class_cache=cache, progress=False)
    assert first.info.class_images["generated"] == 4
    assert second.info.class_images["generated"] == 0  # a full cache hit: nothing regenerated
    assert second.info.class_images["cache_key"] == first.info.class_images["cache_key"]
    assert cat.info.class_images["generated"] == 4 and cat.info.class_images["cache_key"] != first.info.class_images["cache_key"]
    meta = json.loads((cache.root / first.info.class_images["folder"].split("/")[-1] / "meta.json").read_text())
    assert meta["generated_total"] == 4
    # asking for more only generates the missing ones, and keeps the first ones
    more = train_subject(subject("dog3", seed=3), "tiny-random", fast_config(steps=1, num_class_images=6),
                         tmp_path / "dog3", class_cache=cache, progress=False)
    assert more.info.class_images["generated"] == 2


def _generate(pipe, seed=0):
    return pipe("a photo", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(seed)).images


def test_lora_expert_loads_into_plain_diffusers_pipeline(tmp_path, cache):
    cfg = fast_config(steps=10, learning_rate=1e-2)
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    from diffusers import StableDiffusionPipeline

    base = load_base("tiny-random")
    base.save_pretrained(tmp_path / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt_out = lambda: pipe(r.info.instance_prompt, num_inference_steps=2, height=32, width=32,  # noqa: E731
                              output_type="np", generator=torch.Generator().manual_seed(0)).images
    before = prompt_out()
    pipe.load_lora_weights(str(r.expert_dir))
    after = prompt_out()
    assert np.abs(after - before).max() > 1e-3  # the adapter changes the output
    # what diffusers loaded is exactly what was saved, at the trained scale (alpha / rank)
    from peft.utils import get_peft_model_state_dict

    saved = load_file(str(r.expert_dir / "pytorch_lora_weights.safetensors"))
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    assert len(loaded) == len(saved) > 0
    assert sorted(float(v.abs().sum()) for v in loaded.values()) == sorted(float(v.abs().sum()) for v in saved.values())
    peft_cfg = pipe.unet.peft_config[pipe.get_active_adapters()[0]]
    assert (peft_cfg.r, peft_cfg.lora_alpha) == (cfg.lora_rank, cfg.lora_rank)


def test_full_expert_loads_as_unet(tmp_path, cache):
    cfg = fast_config(steps=3, method="full")
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(r.expert_dir / "unet")
    base = load_base("tiny-random")
    assert not np.allclose(_generate(base.pipeline()), _generate(base.pipeline(unet=unet)))


def test_resume_gives_same_weights_as_uninterrupted(tmp_path, cache):
    cfg = fast_config(steps=12, checkpoint_every=4, learning_rate=1e-2)
    straight = train_subject(subject(), "tiny-random", cfg, tmp_path / "a", class_cache=cache, progress=False)

    def crash(step, metrics):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_subject(subject(), "tiny-random", cfg, tmp_path / "b", class_cache=cache, progress=False, on_step=crash)
    assert not (tmp_path / "b").exists()  # no half-written expert
    assert (work_dir_for(tmp_path / "b") / "checkpoints" / "step-00000004").is_dir()
    resumed = train_subject(subject(), "tiny-random", cfg, tmp_path / "b", class_cache=cache, progress=False)
    assert resumed.loop.resumed_from == 4 and len(resumed.loop.history) == 12
    wa = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [h["loss"] for h in straight.loop.history] == [h["loss"] for h in resumed.loop.history]
    assert not work_dir_for(tmp_path / "b").exists()  # cleaned after publishing


def interrupt(out, cache, cfg, after: int) -> None:
    """train_subject crashed after step ``after``: its checkpoints stay in the work folder."""

    def crash(step, metrics):
        if step == after:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_subject(subject(), "tiny-random", cfg, out, class_cache=cache, progress=False, on_step=crash)


def test_resume_with_another_config_is_refused_naming_both_values(tmp_path, cache):
    """The resolved config is in every checkpoint: a resume that changes what is trained is
    refused, naming each field with the checkpoint's value and the new one."""
    interrupt(tmp_path / "b", cache, fast_config(steps=8, checkpoint_every=4, learning_rate=1e-2), after=5)
    state = json.loads((work_dir_for(tmp_path / "b") / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["config"]["steps"] == 8 and state["config"]["resolution"] == 32  # resolved, not the recipe
    changed = fast_config(steps=12, checkpoint_every=4, learning_rate=2e-2)
    with pytest.raises(ConfigError) as err:
        train_subject(subject(), "tiny-random", changed, tmp_path / "b", class_cache=cache, progress=False)
    assert "steps: the checkpoint has 8, this run 12" in str(err.value)
    assert "learning_rate: the checkpoint has 0.01, this run 0.02" in str(err.value)
    assert "--allow-config-change" in str(err.value)
    # only when and what is written changes: resumed as before
    later = fast_config(steps=8, checkpoint_every=2, learning_rate=1e-2, validation_every=4)
    assert train_subject(subject(), "tiny-random", later, tmp_path / "b", class_cache=cache,
                         progress=False).loop.resumed_from == 4


def test_allow_config_change_resumes_anyway(tmp_path, cache):
    interrupt(tmp_path / "b", cache, fast_config(steps=8, checkpoint_every=4, learning_rate=1e-2), after=5)
    r = train_subject(subject(), "tiny-random", fast_config(steps=10, checkpoint_every=4, learning_rate=1e-2),
                      tmp_path / "b", class_cache=cache, progress=False, allow_config_change=True)
    assert r.loop.resumed_from == 4 and r.loop.final_step == 10


def test_same_seed_same_weights(tmp_path, cache):
    cfg = fast_config(steps=3)
    a = train_subject(subject(), "tiny-random", cfg, tmp_path / "a", class_cache=cache, progress=False)
    b = train_subject(subject(), "tiny-random", cfg, tmp_path / "b", class_cache=cache, progress=False)
    wa, wb = (load_file(str(r.expert_dir / "pytorch_lora_weights.safetensors")) for r in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_expert_artifact_records_config_code_and_input(tmp_path, cache):
    cfg = fast_config(steps=4, validation_every=2)
    r = train_subject(subject(tenant="acme"), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    info = ExpertInfo.read(r.expert_dir)
    assert info.subject_id == "dog1" and info.class_noun == "dog" and info.tenant == "acme"
    assert info.instance_prompt == f"a {info.identifier} dog"
    assert info.base_model["spec"] == "tiny-random" and len(info.base_model["hash"]) == 64
    assert info.config["steps"] == 4 and info.config["learning_rate"] == 1e-3 and info.config["resolution"] == 32
    assert info.code_version["package"] and len(info.input_hash) == 64
    assert info.final_loss is not None and info.wall_time_s > 0 and info.num_images == 4
    files = sorted(p.name for p in (r.expert_dir / "validation").iterdir())
    assert files == ["step-00000002.png", "step-00000004.png"]
    assert len(list((r.expert_dir / "instance").iterdir())) == 4
    # a different photo changes the input hash
    other = subject(seed=5)
    assert other.input_hash() != subject().input_hash()


def test_existing_expert_is_not_overwritten(tmp_path, cache):
    cfg = fast_config(steps=1)
    train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    with pytest.raises(ConfigError, match="already holds an expert; pass --overwrite"):
        train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)


def test_user_identifier_and_text_encoder_lora(tmp_path, cache):
    cfg = fast_config(steps=2, train_text_encoder=True, with_prior_preservation=False)
    r = train_subject(subject(identifier="sks"), "tiny-random", cfg, tmp_path / "e", class_cache=cache, progress=False)
    assert r.info.identifier == "sks" and r.info.class_images is None
    keys = load_file(str(r.expert_dir / "pytorch_lora_weights.safetensors")).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


@pytest.mark.parametrize("change", [{"gradient_checkpointing": True}, {"cache_latents": False}])
def test_memory_and_speed_options_keep_the_same_weights(tmp_path, cache, change):
    """Gradient checkpointing and latent caching change cost, not maths: same seed, same weights."""
    cfg = fast_config(steps=3, method="full")
    ref = train_subject(subject(), "tiny-random", cfg, tmp_path / "ref", class_cache=cache, progress=False)
    alt = train_subject(subject(), "tiny-random", fast_config(steps=3, method="full", **change), tmp_path / "alt",
                        class_cache=cache, progress=False)
    from diffusers import UNet2DConditionModel

    a = UNet2DConditionModel.from_pretrained(ref.expert_dir / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(alt.expert_dir / "unet").state_dict()
    if "gradient_checkpointing" in change:  # recomputation runs the same kernels on the same shapes: bit for bit
        for k in a:
            assert torch.equal(a[k], b[k]), k
    else:
        # Without the cache the VAE encodes a different batch shape each step (the chosen
        # images, not all of them in chunks), and conv kernels sum in a shape-dependent order:
        # ~1e-7 differences in the latents. The losses agree to that precision; the weights do
        # not bit-for-bit, because Adam divides by sqrt(v), so a parameter whose gradient is
        # near zero can move by up to lr either way on a 1e-7 difference.
        # The bound is that summation-order noise as this machine shows it: the reference run
        # again at 2 threads (helpers.NOISE_MARGIN).
        with torch_threads(2):
            ref2 = train_subject(subject(), "tiny-random", cfg, tmp_path / "ref2", class_cache=cache, progress=False)
        la, lb, l2 = ([h["loss"] for h in r.loop.history] for r in (ref, alt, ref2))
        assert_within_noise({"loss": curve_gap(la, lb)}, {"loss": curve_spread(la, l2)}, f"losses {la} {lb} {l2}")
    assert alt.info.config[next(iter(change))] == next(iter(change.values()))
