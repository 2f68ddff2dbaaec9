"""Loss and adapter options practitioners know from diffusers' scripts, kohya and the rest:
offset noise, min-SNR-γ weighting and DoRA. Each is off by default, so a run without them
trains exactly as before (tests/test_golden.py keeps the fixed-seed values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import fast_config, picture
from safetensors.torch import load_file
from test_families import _render, own_memory

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.expert import open_expert
from dreamfleet.core.models import load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.config import TrainConfig
from dreamfleet.trainers.dreambooth import DreamBoothObjective, SubjectData, prepare_subject
from dreamfleet.trainers.fit import train_packed, train_subject


def subject(i: int = 0) -> SubjectData:
    return SubjectData(f"opt{i}", "dog", [picture(80 + 10 * i + j) for j in range(3)])


def objective(spec: str = "tiny-random", **kw) -> DreamBoothObjective:
    cfg = fast_config(**{"with_prior_preservation": False, "batch_size": 4, **kw})
    return DreamBoothObjective.from_prepared(prepare_subject(subject(), spec, cfg))


def test_offset_noise_adds_one_value_per_image_and_channel():
    """ε-prediction: the target is the noise; with ``noise_offset`` it is the same draw plus
    one N(0, offset²) value per image and channel, constant over the pixels."""
    plain, offset = objective().batch(3, 0), objective(noise_offset=0.5).batch(3, 0)
    shift = offset.noisy.target - plain.noisy.target
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-6)
    assert 0.2 < float(per_channel.std()) < 1.0  # ~0.5: the offset's scale, one value per (image, channel)


def test_min_snr_gamma_weights_each_sample_as_diffusers():
    """``min(SNR, γ) / SNR`` per sample (diffusers' train_text_to_image.py), and the loss is
    diffusers' per-sample weighted MSE; without ``snr_gamma`` there is no weighting at all."""
    from diffusers.training_utils import compute_snr

    obj = objective(snr_gamma=5.0, batch_size=16)
    b = obj.batch(0, 0)
    snr = compute_snr(obj.base.noise_scheduler, b.noisy.timesteps)
    expected = torch.clamp(snr, max=5.0) / snr
    assert expected.min() < 0.99, b.noisy.timesteps  # some timesteps here have SNR above γ
    assert torch.allclose(b.noisy.weighting.flatten(), expected)
    pred = torch.randn(b.noisy.target.shape, generator=torch.Generator().manual_seed(0))
    reference = (F.mse_loss(pred, b.noisy.target, reduction="none").mean(dim=(1, 2, 3)) * expected).mean()
    assert float(obj.loss_terms(pred, b)["loss"]) == pytest.approx(float(reference), rel=1e-6)
    assert objective().batch(0, 0).noisy.weighting is None


def test_options_are_checked_where_they_are_given(tmp_path):
    with pytest.raises(ConfigError, match="snr_gamma"):
        TrainConfig(snr_gamma=0.0)
    with pytest.raises(ConfigError, match="noise_offset"):
        TrainConfig(noise_offset=-0.1)
    with pytest.raises(ConfigError, match=r"use_dora .* method=lora"):
        TrainConfig(method="full", use_dora=True)
    with pytest.raises(ConfigError, match="rectified flow: snr_gamma"):
        prepare_subject(subject(), "tiny-flux", fast_config(snr_gamma=5.0, with_prior_preservation=False))
    with pytest.raises(ConfigError, match="use_dora"):
        train_packed([subject(0), subject(1)], "tiny-random", [fast_config(use_dora=True, seed=s) for s in (0, 1)],
                     [tmp_path / "a", tmp_path / "b"], progress=False)


def stock_and_ours(tmp_path, expert_dir):
    """Stock StableDiffusionPipeline over tiny-random saved as a plain folder (the expert's
    scheduler), dreamfleet's own pipeline of the expert, and the expert's info."""
    from diffusers import StableDiffusionPipeline

    load_base("tiny-random").save_pretrained(tmp_path / "sd")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    own_memory(stock)
    ours, info = open_expert(expert_dir)
    stock.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    return stock, ours, info


def test_a_dora_expert_loads_in_plain_diffusers_with_identical_output(tmp_path):
    """DoRA (PEFT ``use_dora``): the expert holds a magnitude vector per adapted layer beside
    the LoRA matrices, and StableDiffusionPipeline.load_lora_weights renders exactly what
    dreamfleet's expert pipeline does."""

    cfg = fast_config(steps=4, learning_rate=1e-2, use_dora=True, with_prior_preservation=False)
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "dora", class_cache=ClassImageCache(tmp_path / "c"),
                      progress=False)
    saved = load_file(str(r.expert_dir / "pytorch_lora_weights.safetensors"))
    magnitudes = [k for k in saved if "lora_magnitude_vector" in k]
    layers = {k.rsplit(".lora", 1)[0] for k in saved}
    assert magnitudes and len(magnitudes) == len(layers)  # one magnitude vector per adapted layer
    assert r.info.config["use_dora"] is True
    stock, ours, info = stock_and_ours(tmp_path, r.expert_dir)
    before = _render(stock, info.instance_prompt)
    stock.load_lora_weights(str(r.expert_dir))
    assert any(getattr(m, "use_dora", {}).get("default_0") or getattr(m, "use_dora", {}).get("default")
               for m in stock.unet.modules() if hasattr(m, "use_dora"))
    theirs = _render(stock, info.instance_prompt)
    assert np.abs(theirs - before).max() > 1e-3
    assert np.array_equal(theirs, _render(ours, info.instance_prompt))


def test_each_photo_trains_on_its_own_caption():
    """Captions (``--captions``): photo i is conditioned on its caption with the identifier and
    class noun filled in, a photo without one on the instance prompt; without the option every
    photo gets the instance prompt, as before."""
    captions = ["a photo of {identifier} {class_noun} on grass", None, "{identifier} {class_noun}, asleep"]
    s = SubjectData("cap", "dog", [picture(90 + i) for i in range(3)], captions=captions)
    p = prepare_subject(s, "tiny-random", fast_config(captions=True, with_prior_preservation=False))
    v = p.identifier
    assert p.instance_prompts == [f"a photo of {v} dog on grass", p.instance_prompt, f"{v} dog, asleep"]
    obj = DreamBoothObjective.from_prepared(p)
    cond = obj._cond(torch.tensor([2, 0, 1, 2]), False, p.instance.sizes[[2, 0, 1, 2]], p.instance.hw)
    kind, base = obj.kind, obj.base
    for row, i in enumerate([2, 0, 1, 2]):
        with torch.no_grad():
            want = kind.encode(base, kind.tokenize(base, [p.instance_prompts[i]], p.device))["encoder_hidden_states"]
        assert torch.equal(cond["encoder_hidden_states"][row], want[0].float())
    off = prepare_subject(s, "tiny-random", fast_config(with_prior_preservation=False))
    assert off.instance_prompts is None
    plain = DreamBoothObjective.from_prepared(off)._cond(torch.tensor([0, 2]), False, off.instance.sizes[[0, 2]],
                                                                   off.instance.hw)
    assert torch.equal(plain["encoder_hidden_states"][0], plain["encoder_hidden_states"][1])
    assert s.input_hash() != SubjectData("cap", "dog", s.images).input_hash()  # captions are part of the input


class _Linear:
    """The smallest objective: one linear layer fitted to the identity on seeded inputs."""

    def __init__(self):
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def trainable_modules(self):
        return {"lin": self.lin}

    def loss(self, step, micro_step):
        from dreamfleet.trainers.loop import step_generator

        x = torch.randn(8, 4, generator=step_generator(0, step))
        loss = ((self.lin(x) - x) ** 2).mean()
        return loss, {"loss": float(loss.detach())}


def _settings(ema_decay: float, steps: int = 5, checkpoint_every: int = 0):
    from dreamfleet.trainers.config import LoopConfig, OptimizerConfig
    from dreamfleet.trainers.loop import LoopSettings

    return LoopSettings(OptimizerConfig(learning_rate=0.1, ema_decay=ema_decay),
                        LoopConfig(steps=steps, checkpoint_every=checkpoint_every, validation_every=0), progress=False)


def test_ema_is_what_the_loop_ends_with_and_follows_diffusers_decay(tmp_path):
    """With ``ema_decay`` the trained module ends holding the EMA of its weights after each
    step (decay (1+k)/(10+k), capped, 0 at the first step: diffusers' EMAModel), not the raw
    weights; a run resumed from a checkpoint ends with the same EMA as one run straight."""
    from dreamfleet.trainers.loop import LoopHooks, run_loop

    obj, raw = _Linear(), []
    hooks = LoopHooks(on_step=lambda step, m: raw.append(obj.lin.weight.detach().clone()))
    run_loop(obj, _settings(0.5), hooks=hooks)
    ema = raw[0]
    for n, w in enumerate(raw[1:], 2):
        d = min(n / (9 + n), 0.5)
        ema = d * ema + (1 - d) * w
    assert torch.allclose(obj.lin.weight, ema, atol=1e-6) and not torch.allclose(obj.lin.weight, raw[-1], atol=1e-3)
    plain = _Linear()
    run_loop(plain, _settings(0.0))
    assert torch.equal(plain.lin.weight, raw[-1])  # EMA does not change the training itself

    stopped, seen = _Linear(), []
    stop = LoopHooks(on_step=lambda step, m: seen.append(step), should_stop=lambda: len(seen) >= 3)
    run_loop(stopped, _settings(0.5, checkpoint_every=2), checkpoint_dir=tmp_path / "ck", hooks=stop)
    resumed = _Linear()
    result = run_loop(resumed, _settings(0.5, checkpoint_every=2), checkpoint_dir=tmp_path / "ck")
    assert result.resumed_from == 2 and torch.allclose(resumed.lin.weight, obj.lin.weight, atol=1e-7)


def test_an_ema_expert_publishes_the_averaged_weights(tmp_path):
    cache = ClassImageCache(tmp_path / "c")
    kw = dict(steps=4, learning_rate=1e-2, with_prior_preservation=False)
    raw = train_subject(subject(), "tiny-random", fast_config(**kw), tmp_path / "raw", class_cache=cache,
                        progress=False)
    ema = train_subject(subject(), "tiny-random", fast_config(ema_decay=0.9, **kw), tmp_path / "ema",
                        class_cache=cache, progress=False)
    assert [h["loss"] for h in raw.loop.history] == [h["loss"] for h in ema.loop.history]
    a, b = (load_file(str(r.expert_dir / "pytorch_lora_weights.safetensors")) for r in (raw, ema))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert ema.info.config["ema_decay"] == 0.9


def export_trained(tmp_path, sid: str, cfg, *flags: str):
    """Train ``cfg`` on the test subject, publish it as ``sid`` in tmp_path/reg and run
    `dreamfleet experts export SID ... --out tmp_path/SID.safetensors`: (result, exit code, file)."""
    from dreamfleet.cli.main import main
    from dreamfleet.registry import Registry

    r = train_subject(subject(), "tiny-random", cfg, tmp_path / sid, class_cache=ClassImageCache(tmp_path / "c"),
                      progress=False)
    Registry(tmp_path / "reg").publish(sid, r.expert_dir)
    out = tmp_path / f"{sid}.safetensors"
    return r, main(["experts", "export", sid, "--registry", str(tmp_path / "reg"), *flags, "--out", str(out)]), out


def test_kohya_export_loads_back_in_plain_diffusers_with_identical_output(tmp_path, capsys):
    """`dreamfleet experts export SUBJECT --format kohya`: one file in the kohya/A1111 layout
    (lora_unet_*, lora_te1_*, lora_down/lora_up and each layer's alpha, here the expert's 8, not
    the rank), which StableDiffusionPipeline.load_lora_weights converts back and renders exactly
    as it renders the expert's own file. What it cannot export is refused, saying why."""
    cfg = fast_config(steps=4, learning_rate=1e-2, lora_rank=4, lora_alpha=8, train_text_encoder=True,
                      with_prior_preservation=False)
    r, code, out = export_trained(tmp_path, "opt0", cfg)
    assert code == 0
    kohya = load_file(str(out))
    assert all(k.startswith(("lora_unet_", "lora_te1_")) for k in kohya), sorted(kohya)[:5]
    assert any(k.startswith("lora_te1_") for k in kohya) and any(".lora_down.weight" in k for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    stock, ours, info = stock_and_ours(tmp_path, r.expert_dir)
    before = _render(stock, info.instance_prompt)
    stock.load_lora_weights(str(out))
    theirs = _render(stock, info.instance_prompt)
    assert np.abs(theirs - before).max() > 1e-3
    stock.unload_lora_weights()
    stock.load_lora_weights(str(r.expert_dir))  # the expert's own file, alpha from its metadata
    assert np.array_equal(theirs, _render(stock, info.instance_prompt))
    # dreamfleet's loader (from memory, alpha folded into the up-projections) renders the same
    # picture up to float rounding; it ignored alpha before (0.067 off at alpha 8, rank 4)
    assert np.abs(theirs - _render(ours, info.instance_prompt)).max() < 1e-5
    assert export_trained(tmp_path, "full0", fast_config(steps=1, method="full", with_prior_preservation=False))[1] == 2
    assert "method=full" in capsys.readouterr().err


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the TensorBoard event files in ``folder`` (TFRecord framing: length,
    its CRC, an Event proto, its CRC), read without TensorBoard."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_each_subjects_loss_lr_and_gradient_norm(tmp_path):
    """``--tensorboard-dir``: per subject, one scalar per step for the loss, its terms, the
    learning rate and the gradient norm, equal to what the loop recorded; packed subjects each
    get their own."""
    cfg = fast_config(steps=3, tensorboard_dir=str(tmp_path / "tb"), with_prior_preservation=False)
    r = train_subject(subject(), "tiny-random", cfg, tmp_path / "e", class_cache=ClassImageCache(tmp_path / "c"),
                      progress=False)
    got = _scalars(tmp_path / "tb" / "opt0")
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(got), sorted(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3]
    assert [v for _, v in got["train/loss"]] == pytest.approx([h["loss"] for h in r.loop.history], rel=1e-6)
    train_packed([subject(1), subject(2)], "tiny-random", [fast_config(**{**cfg.__dict__, "seed": s}) for s in (0, 1)],
                 [tmp_path / "p1", tmp_path / "p2"], class_cache=ClassImageCache(tmp_path / "c"), progress=False)
    for sid in ("opt1", "opt2"):
        packed = _scalars(tmp_path / "tb" / sid)
        assert len(packed["train/loss"]) == 3 and len(packed["train/lr"]) == 3, sorted(packed)


def test_a_full_expert_exports_as_one_checkpoint_that_from_single_file_loads(tmp_path, capsys):
    """`dreamfleet experts export SUBJECT --format ldm`: a full expert (its UNet and trained text
    encoder, the base's VAE) in the original single-file layout; diffusers' from_single_file
    converts it back and renders what dreamfleet's own pipeline of the expert renders."""
    from diffusers import StableDiffusionPipeline

    cfg = fast_config(steps=2, method="full", train_text_encoder=True, learning_rate=1e-3,
                      with_prior_preservation=False)
    r, code, out = export_trained(tmp_path, "full0", cfg, "--format", "ldm")
    assert code == 0
    keys = load_file(str(out)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    stock, ours, info = stock_and_ours(tmp_path, r.expert_dir)
    single = StableDiffusionPipeline.from_single_file(str(out), config=str(tmp_path / "sd"), safety_checker=None,
                                                      requires_safety_checker=False)
    single.set_progress_bar_config(disable=True)
    own_memory(single)
    single.scheduler = stock.scheduler
    assert np.abs(_render(single, info.instance_prompt) - _render(stock, info.instance_prompt)).max() > 1e-3
    assert np.abs(_render(single, info.instance_prompt) - _render(ours, info.instance_prompt)).max() < 1e-5
    assert export_trained(tmp_path, "lora0", fast_config(steps=1, with_prior_preservation=False),
                          "--format", "ldm")[1] == 2
    assert "--format kohya" in capsys.readouterr().err
