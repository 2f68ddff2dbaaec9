"""Multi-subject packing on the tiny-random model: each packed subject ends where its solo run ends.

Tolerances. The packed run does the solo runs' maths on a batch of 2S samples instead of 2,
and CPU kernels block their sums by batch shape, so the two differ by float rounding, which
Adam amplifies (see ``helpers.NOISE_MARGIN``). No fixed number bounds that on every CPU, so
each comparison is against the spread of the same solo runs at 1 and at 2 torch threads on
this machine, times ``NOISE_MARGIN``: losses and gradient norms by their largest relative
difference over the run, LoRA weights by the median and largest per-tensor relative norm and
the largest element, images by their largest pixel difference. Every test runs at 1 and at 2
threads (packed at n threads against solo at n threads). A real difference in the update (a
wrong seed, one clip for all subjects) is 17-6000x the spread (numbers in helpers.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    ROUNDING_FLOOR,
    assert_within_noise,
    curve_gap,
    fast_config,
    picture,
    torch_threads,
    weight_gap,
)
from safetensors.torch import load_file

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import ExpertInfo
from dreamfleet.core.models import load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData, prepare_subject
from dreamfleet.trainers.fit import train_packed, train_subject
from dreamfleet.trainers.lora import UNET_TARGETS, add_lora, initial_lora
from dreamfleet.trainers.packing import PackedLoRA, check_packable, pack_work_dir

STEPS, LR = 6, 1e-2
SEEDS = [0, 1, 0]  # two subjects share a seed (and so their initial adapter), as in a fleet on defaults
WEIGHTS = "pytorch_lora_weights.safetensors"
THREADS = [1, 2]
CURVES = ("loss", "loss_instance", "loss_prior", "grad_norm")


def subject(i: int) -> SubjectData:
    return SubjectData(f"dog{i}", "dog", [picture(100 * i + j) for j in range(4)])


def configs(**kw):
    # max_grad_norm below the gradients' norms (~0.1-0.3): clipping acts, and must act per subject
    return [fast_config(steps=STEPS, learning_rate=LR, seed=seed, max_grad_norm=0.05, **kw) for seed in SEEDS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Solo and packed runs of the same three subjects, at 1 and at 2 torch threads."""
    root = tmp_path_factory.mktemp("packing")
    cache = ClassImageCache(root / "class-cache")
    out = {"root": root, "cache": cache}
    for n in THREADS:
        with torch_threads(n):
            solo = [
                train_subject(
                    subject(i), "tiny-random", c, root / f"solo{i}-t{n}", class_cache=cache, progress=False
                )
                for i, c in enumerate(configs())
            ]
            packed = train_packed(
                [subject(i) for i in range(len(SEEDS))],
                "tiny-random",
                configs(),
                [root / f"packed{i}-t{n}" for i in range(len(SEEDS))],
                class_cache=cache,
                progress=False,
            )
        out[n] = {"solo": solo, "packed": packed}
    return out


def all_weights(results) -> dict[str, torch.Tensor]:
    """Every subject's LoRA tensors in one dict (keys prefixed with the subject)."""
    return {
        f"{r.info.subject_id}/{k}": v
        for r in results
        for k, v in load_file(str(r.expert_dir / WEIGHTS)).items()
    }


def curves_gap(a_results, b_results, key: str) -> float:
    """The largest relative difference of one logged curve over every subject and step."""
    return max(
        curve_gap([h[key] for h in a.loop.history], [h[key] for h in b.loop.history])
        for a, b in zip(a_results, b_results, strict=True)
    )


@pytest.fixture(scope="module")
def noise(runs):
    """The spread of the solo runs between 1 and 2 threads: curves, weights, images (the
    reductions floored at a few ulp, see helpers.ROUNDING_FLOOR)."""
    one, two = runs[1]["solo"], runs[2]["solo"]
    pipe = load_base("tiny-random").pipeline()
    images = max(
        float(np.abs(_expert_images(pipe, a) - _expert_images(pipe, b)).max())
        for a, b in zip(one, two, strict=True)
    )
    return {
        "curves": {k: max(curves_gap(one, two, k), ROUNDING_FLOOR) for k in CURVES},
        "weights": weight_gap(all_weights(one), all_weights(two)),
        "images": {"max_abs": max(images, ROUNDING_FLOOR)},  # pixels in [0, 1]
    }


@pytest.mark.parametrize("threads", THREADS)
def test_packed_losses_equal_solo_losses(runs, noise, threads):
    solo, packed = runs[threads]["solo"], runs[threads]["packed"]
    for s, p in zip(solo, packed, strict=True):
        assert [h["step"] for h in p.loop.history] == list(range(1, STEPS + 1))
        assert all(h["grad_norm"] > 0.05 for h in s.loop.history[1:])  # clipped from step 2 on
    gaps = {k: curves_gap(solo, packed, k) for k in CURVES}
    assert_within_noise(gaps, noise["curves"], f"packed vs solo curves at {threads} threads")
    for s, p in zip(solo, packed, strict=True):
        gap = {"loss": curve_gap([s.info.final_loss], [p.info.final_loss])}
        assert_within_noise(gap, {"loss": noise["curves"]["loss"]}, f"{s.info.subject_id} final loss")
    # the subjects really are different runs: packing did not give them one another's numbers
    finals = [r.info.final_loss for r in packed]
    assert len(set(finals)) == len(finals)


@pytest.mark.parametrize("threads", THREADS)
def test_packed_experts_hold_the_solo_weights(runs, noise, threads):
    solo, packed = runs[threads]["solo"], runs[threads]["packed"]
    wa, wb = all_weights(solo), all_weights(packed)
    assert len(wa) == 64 * len(SEEDS)  # 16 attention blocks' q, k, v, out: A and B, per subject
    assert_within_noise(weight_gap(wa, wb), noise["weights"], f"packed vs solo weights at {threads} threads")
    for s, p in zip(solo, packed, strict=True):
        a_info, b_info = ExpertInfo.read(s.expert_dir), ExpertInfo.read(p.expert_dir)
        assert (b_info.identifier, b_info.method, b_info.config) == (
            a_info.identifier,
            a_info.method,
            a_info.config,
        )
        assert b_info.train_stats["packed"]["subjects"] == ["dog0", "dog1", "dog2"]
        assert sorted(q.name for q in (p.expert_dir / "validation").iterdir()) == [f"step-{STEPS:08d}.png"]
    assert not pack_work_dir([r.expert_dir for r in packed]).exists()  # cleaned after publishing


def _generate(pipe, prompt: str) -> np.ndarray:
    return pipe(
        prompt,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


def _expert_images(pipe, result, name: str = "expert") -> np.ndarray:
    pipe.load_lora_weights(str(result.expert_dir), adapter_name=name)
    try:
        return _generate(pipe, result.info.instance_prompt)
    finally:
        pipe.delete_adapters(name)


@pytest.mark.parametrize("threads", THREADS)
def test_packed_expert_generates_the_solo_experts_images(runs, noise, threads):
    pipe = load_base("tiny-random").pipeline()
    for solo, packed in zip(runs[threads]["solo"], runs[threads]["packed"], strict=True):
        before = _generate(pipe, solo.info.instance_prompt)
        ours, theirs = _expert_images(pipe, packed), _expert_images(pipe, solo)
        # the adapter changes the picture (by far more than a quarter of one 8-bit level) ...
        assert np.abs(theirs - before).max() > 1e-3
        # ... and both experts change it alike
        gap = {"max_abs": float(np.abs(ours - theirs).max())}
        assert_within_noise(gap, noise["images"], f"{solo.info.subject_id} images at {threads} threads")


@pytest.mark.parametrize("threads", THREADS)
def test_routing_per_sample_matches_one_adapter_at_a_time(threads):
    """Interleaved subjects in one batch give each sample its own adapter's output.

    Tolerance: the base UNet itself gives a sample a slightly different output in a batch of
    4 than alone (kernels block by batch shape; measured 1.2e-6 on outputs of ~1); the packed
    outputs must be within NOISE_MARGIN of that spread (measured 1.1e-6)."""
    unet = load_base("tiny-random").unet
    adapters = [initial_lora(unet, 4, 4, UNET_TARGETS, seed=s) for s in (0, 1, 2)]
    g = torch.Generator().manual_seed(0)
    for w in adapters:  # B starts at zero: give it trained-adapter-sized values so the outputs differ
        for k in w.layers:
            if k.endswith("lora_B.weight"):
                w.layers[k] = 0.05 * torch.randn(w.layers[k].shape, generator=g)
    x, cond = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([10, 500, 999, 3])

    def one_by_one() -> torch.Tensor:
        return torch.cat([unet(x[i : i + 1], t[i : i + 1], cond[i : i + 1]).sample for i in range(4)])

    with torch_threads(threads), torch.no_grad():
        spread = {"max_abs": max(float((unet(x, t, cond).sample - one_by_one()).abs().max()), ROUNDING_FLOOR)}
        packed = PackedLoRA(unet, adapters)
        packed.select(torch.tensor([2, 0, 2, 1]))
        mixed = unet(x, t, cond).sample
        packed.select(torch.tensor([1, 2, 0, 0]))  # every sample through another adapter
        assert (unet(x, t, cond).sample - mixed).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # adapters matter
        for i, s in enumerate([2, 0, 2, 1]):
            packed.select(s)
            alone = unet(x[i : i + 1], t[i : i + 1], cond[i : i + 1]).sample
            gap = {"max_abs": float((mixed[i : i + 1] - alone).abs().max())}
            assert_within_noise(gap, spread, f"sample {i} routed to adapter {s}")
        packed.select(1)  # and adapter 1 is PEFT's adapter for seed 1, run by PEFT itself
        ours = unet(x, t, cond).sample
        packed.remove()
        add_lora(unet, 4, 4, UNET_TARGETS, seed=1)
        for name, m in unet.named_modules():
            if hasattr(m, "lora_B"):
                m.lora_B["default"].weight.copy_(adapters[1].layers[f"{name}.lora_B.weight"])
        gap = {"max_abs": float((ours - unet(x, t, cond).sample).abs().max())}
        assert_within_noise(gap, spread, "packed adapter 1 against PEFT's")


@pytest.mark.parametrize("threads", THREADS)
def test_packed_run_resumes_to_the_same_weights(runs, tmp_path, threads):
    """Bit for bit: the same code at the same thread count sums in the same order."""
    cfgs = configs(checkpoint_every=3)
    subjects = [subject(i) for i in range(len(cfgs))]
    outs = [tmp_path / f"p{i}" for i in range(len(cfgs))]

    def crash(step, metrics):
        if step == 4:
            raise RuntimeError("simulated crash")

    with torch_threads(threads):
        with pytest.raises(RuntimeError, match="simulated crash"):
            train_packed(
                subjects, "tiny-random", cfgs, outs, class_cache=runs["cache"], progress=False, on_step=crash
            )
        assert (pack_work_dir(outs) / "checkpoints" / "step-00000003").is_dir()
        resumed = train_packed(subjects, "tiny-random", cfgs, outs, class_cache=runs["cache"], progress=False)
    for straight, again in zip(runs[threads]["packed"], resumed, strict=True):
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
