"""Multi-subject packing on the tiny-random model: each packed subject ends where its solo run ends.

Tolerances. The packed run does the solo runs' maths on a batch of 2S samples instead of 2,
and CPU kernels block their sums by batch shape, so results differ by float rounding. Losses
and gradient norms are compared at 1e-5 relative (measured: <= 2.3e-7). LoRA weights are
compared by each tensor's relative norm (2e-4; measured <= 3.6e-5) and elementwise to 1% of
one step's learning rate (1e-4; measured <= 1.6e-5): Adam divides by sqrt(v), so an element
whose gradient is near zero can move by a fraction of lr either way on a 1e-7 difference of
its gradient (the effect test_dreambooth.py describes for latent caching), while a real
difference in the update (a wrong seed, one clip for all subjects) moves elements by about lr
per step and fails all three checks. Images are compared at 1e-5 (measured <= 1e-6, against
an adapter effect of ~0.13).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fast_config, picture
from safetensors.torch import load_file

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import ExpertInfo
from dreamfleet.core.models import load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData, prepare_subject, train_subject
from dreamfleet.trainers.lora import UNET_TARGETS, add_lora, initial_lora
from dreamfleet.trainers.packing import PackedLoRA, check_packable, pack_work_dir, train_packed

STEPS, LR = 6, 1e-2
SEEDS = [0, 1, 0]  # two subjects share a seed (and so their initial adapter), as in a fleet on defaults
WEIGHTS = "pytorch_lora_weights.safetensors"


def subject(i: int) -> SubjectData:
    return SubjectData(f"dog{i}", "dog", [picture(100 * i + j) for j in range(4)])


def configs(**kw):
    # max_grad_norm below the gradients' norms (~0.1-0.3): clipping acts, and must act per subject
    return [fast_config(steps=STEPS, learning_rate=LR, seed=seed, max_grad_norm=0.05, **kw) for seed in SEEDS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    cache = ClassImageCache(root / "class-cache")
    cfgs = configs()
    solo = [
        train_subject(subject(i), "tiny-random", c, root / f"solo{i}", class_cache=cache, progress=False)
        for i, c in enumerate(cfgs)
    ]
    packed = train_packed(
        [subject(i) for i in range(len(cfgs))],
        "tiny-random",
        cfgs,
        [root / f"packed{i}" for i in range(len(cfgs))],
        class_cache=cache,
        progress=False,
    )
    return {"root": root, "cache": cache, "solo": solo, "packed": packed}


def test_packed_losses_equal_solo_losses(runs):
    for solo, packed in zip(runs["solo"], runs["packed"], strict=True):
        assert [h["step"] for h in packed.loop.history] == list(range(1, STEPS + 1))
        assert all(h["grad_norm"] > 0.05 for h in solo.loop.history[1:])  # clipped from step 2 on
        for key in ("loss", "loss_instance", "loss_prior", "grad_norm"):
            a = [h[key] for h in solo.loop.history]
            b = [h[key] for h in packed.loop.history]
            np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=f"{solo.info.subject_id} {key}")
        assert packed.info.final_loss == pytest.approx(solo.info.final_loss, rel=1e-5)
    # the subjects really are different runs: packing did not give them one another's numbers
    finals = [r.info.final_loss for r in runs["packed"]]
    assert len(set(finals)) == len(finals)


def test_packed_experts_hold_the_solo_weights(runs):
    for solo, packed in zip(runs["solo"], runs["packed"], strict=True):
        wa = load_file(str(solo.expert_dir / WEIGHTS))
        wb = load_file(str(packed.expert_dir / WEIGHTS))
        assert wa.keys() == wb.keys() and len(wa) == 64  # 16 attention blocks' q, k, v, out: A and B
        for k in wa:
            rel = float((wb[k] - wa[k]).norm() / wa[k].norm())
            assert rel < 2e-4, (k, rel)
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0.01 * LR, msg=k)
        a_info, b_info = ExpertInfo.read(solo.expert_dir), ExpertInfo.read(packed.expert_dir)
        assert (b_info.identifier, b_info.method, b_info.config) == (
            a_info.identifier,
            a_info.method,
            a_info.config,
        )
        assert b_info.train_stats["packed"]["subjects"] == ["dog0", "dog1", "dog2"]
        assert sorted(p.name for p in (packed.expert_dir / "validation").iterdir()) == [
            f"step-{STEPS:08d}.png"
        ]
    assert not pack_work_dir([r.expert_dir for r in runs["packed"]]).exists()  # cleaned after publishing


def _generate(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_packed_expert_generates_the_solo_experts_images(runs):
    pipe = load_base("tiny-random").pipeline()
    for solo, packed in zip(runs["solo"], runs["packed"], strict=True):
        prompt = solo.info.instance_prompt
        before = _generate(pipe, prompt)
        images = {}
        for name, r in (("solo", solo), ("packed", packed)):
            pipe.load_lora_weights(str(r.expert_dir), adapter_name=name)
            images[name] = _generate(pipe, prompt)
            pipe.delete_adapters(name)
        effect = np.abs(images["solo"] - before).max()
        gap = np.abs(images["packed"] - images["solo"]).max()
        assert effect > 1e-3  # the adapter changes the picture ...
        assert gap < 1e-5 and gap < effect / 1000, (gap, effect)  # ... and both experts change it alike


def test_routing_per_sample_matches_one_adapter_at_a_time():
    """Interleaved subjects in one batch give each sample its own adapter's output."""
    unet = load_base("tiny-random").unet
    adapters = [initial_lora(unet, 4, 4, UNET_TARGETS, seed=s) for s in (0, 1, 2)]
    g = torch.Generator().manual_seed(0)
    for w in adapters:  # B starts at zero: give it trained-adapter-sized values so the outputs differ
        for k in w.layers:
            if k.endswith("lora_B.weight"):
                w.layers[k] = 0.05 * torch.randn(w.layers[k].shape, generator=g)
    packed = PackedLoRA(unet, adapters)
    x, cond = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([10, 500, 999, 3])
    with torch.no_grad():
        packed.select(torch.tensor([2, 0, 2, 1]))
        mixed = unet(x, t, cond).sample
        packed.select(torch.tensor([1, 2, 0, 0]))  # every sample through another adapter
        assert (unet(x, t, cond).sample - mixed).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # adapters matter
        for i, s in enumerate([2, 0, 2, 1]):
            packed.select(s)
            alone = unet(x[i : i + 1], t[i : i + 1], cond[i : i + 1]).sample
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
        packed.select(1)  # and adapter 1 is PEFT's adapter for seed 1, run by PEFT itself
        ours = unet(x, t, cond).sample
        packed.remove()
        add_lora(unet, 4, 4, UNET_TARGETS, seed=1)
        for name, m in unet.named_modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.copy_(adapters[1].layers[f"{name}.lora_B.weight"])
        torch.testing.assert_close(ours, unet(x, t, cond).sample, rtol=1e-5, atol=1e-5)


def test_packed_run_resumes_to_the_same_weights(runs, tmp_path):
    cfgs = configs(checkpoint_every=3)
    subjects = [subject(i) for i in range(len(cfgs))]
    outs = [tmp_path / f"p{i}" for i in range(len(cfgs))]

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_packed(
            subjects, "tiny-random", cfgs, outs, class_cache=runs["cache"], progress=False, on_step=crash
        )
    assert (pack_work_dir(outs) / "checkpoints" / "step-00000003").is_dir()
    resumed = train_packed(subjects, "tiny-random", cfgs, outs, class_cache=runs["cache"], progress=False)
    for straight, again in zip(runs["packed"], resumed, strict=True):
        assert again.loop.resumed_from == 3
        assert [h["loss"] for h in again.loop.history] == [h["loss"] for h in straight.loop.history]
        wa, wb = load_file(str(straight.expert_dir / WEIGHTS)), load_file(str(again.expert_dir / WEIGHTS))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_only_compatible_subjects_pack(tmp_path):
    base = load_base("tiny-random")

    def prepared(i, **kw):
        cfg = fast_config(with_prior_preservation=False, **kw)
        return prepare_subject(subject(i), base, cfg)

    check_packable([prepared(0), prepared(1, seed=7)])  # seeds may differ
    with pytest.raises(ConfigError, match=r"'learning_rate' is 0\.1 here"):
        check_packable([prepared(0), prepared(1, learning_rate=0.1)])
    with pytest.raises(ConfigError, match="UNet LoRA adapters only"):
        check_packable([prepared(0, method="full")])
    with pytest.raises(ConfigError, match="UNet LoRA adapters only"):
        check_packable([prepared(0, train_text_encoder=True)])
    with pytest.raises(ConfigError, match="more than once"):
        check_packable([prepared(0), prepared(0)])
    with pytest.raises(ConfigError, match="one of each per subject"):
        train_packed([subject(0), subject(1)], base, fast_config(), [tmp_path / "only-one"])
