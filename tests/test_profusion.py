"""ProFusion: PromptNet, S* injection and Fusion Sampling (the CPU checks of ../shared/PROFUSION.md)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from dreamfleet.core.errors import ConfigError
from dreamfleet.core.fusion import (
    FusionParams,
    FusionPipeline,
    FusionSampler,
    fusion_update,
    reference_prompt,
)
from dreamfleet.core.models import load_base
from dreamfleet.core.profusion import (
    Injector,
    PromptNet,
    PromptNetArch,
    PromptNetSubject,
    embeddings_of,
    load_image_encoder,
    reference_inputs,
)


@pytest.fixture(scope="module")
def base():
    return load_base("tiny-random")


def ddim(base, **kw):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(base.noise_scheduler.config, **kw)


def test_closed_form_fusion_update_is_a_ddim_sigma_step_then_a_renoise(base):
    """η_f = 1: one DDIM-σ step to t−1 (diffusers' own DDIM step, eta=1) and the forward
    re-noise back to t give the closed form, with its one noise z made of the two draws."""
    s = ddim(base, clip_sample=False)
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps, z1, z2 = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(4))
    for t in s.timesteps[:-1]:
        a_t = float(s.alphas_cumprod[int(t)])
        a_p = float(s.alphas_cumprod[int(t) - 100])
        x_p = s.step(eps, t, x, eta=1.0, variance_noise=z1).prev_sample
        two_step = (a_t / a_p) ** 0.5 * x_p + (1 - a_t / a_p) ** 0.5 * z2
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        spread = (var * (1 - a_t) * (2 - 2 * a_p - var)) ** 0.5 / (1 - a_p)
        z = (var**0.5 * (a_t / a_p) ** 0.5 * z1 + (1 - a_t / a_p) ** 0.5 * z2) / spread
        torch.testing.assert_close(fusion_update(x, eps, a_t, a_p, 1.0, z), two_step, atol=2e-5, rtol=1e-5)


def test_eta_f_zero_is_the_identity(base):
    x, eps, z = torch.randn(3, 1, 4, 8, 8)
    assert torch.equal(fusion_update(x, eps, 0.5, 0.6, 0.0, z), x)
    pipe = base.pipeline()
    fp = FusionPipeline(pipe, identifier="sks", class_noun="dog")
    kw = dict(generator=torch.Generator().manual_seed(0), output_type="latent")
    plain = fp("a sks dog", params=FusionParams(num_inference_steps=3, refine_step=0), **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    fused = fp("a sks dog", num_inference_steps=3, refine_step=2, refine_eta=0.0, **kw).images
    assert torch.equal(plain, fused)


def test_k0_w2_0_is_stock_ddim_classifier_free_guidance_bit_for_bit(base):
    pipe = base.pipeline()
    pipe.scheduler = ddim(base)
    pipe.set_progress_bar_config(disable=True)
    stock = pipe(["a sks dog", "a sks dog on the beach"], num_inference_steps=4, guidance_scale=6.0, eta=0.0,
                 num_images_per_prompt=2, generator=torch.Generator().manual_seed(3), output_type="np").images
    fp = FusionPipeline(pipe, identifier="sks", class_noun="dog")
    ours = fp(["a sks dog", "a sks dog on the beach"], num_images_per_prompt=2,
              params=FusionParams(num_inference_steps=4, guidance_scale=6.0, guidance_scale_ref=0.0, refine_step=0),
              generator=torch.Generator().manual_seed(3), output_type="np").images
    assert ours.shape == stock.shape == (4, 32, 32, 3)
    assert np.array_equal(ours, stock)


def test_the_hook_with_the_placeholders_own_embedding_changes_nothing(base):
    te = base.text_encoder
    ids = base.tokenizer(["a sks dog", "sks on a beach"], padding="max_length", max_length=base.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    sks = base.tokenizer("sks", add_special_tokens=False).input_ids
    assert len(sks) == 1
    mask = ids == sks[0]
    with torch.no_grad():
        plain = te(ids)[0]
        own = embeddings_of(te)(input_ids=ids)[mask].reshape(2, 1, -1)
        injector = Injector(te)
        with injector.inject(mask, own):
            hooked = te(ids)[0]
        with injector.inject(mask, torch.randn_like(own)):
            other = te(ids)[0]
        injector.remove()
        after = te(ids)[0]
    assert torch.equal(hooked, plain) and torch.equal(after, plain)
    assert not torch.allclose(other, plain)
    bad = Injector(te)
    with pytest.raises(ValueError, match="placeholder token"), bad.inject(mask, torch.zeros(2, 2, own.shape[-1])):
        pass
    bad.remove()


@pytest.mark.parametrize(("k", "n"), [(None, 1), (8, 1), (4, 4), (2, 16), (1, 64)])
def test_token_count_follows_the_latent_size(base, k, n):
    """N = (H_latent / (8k))²: a 64x64 latent gives one token at k = 8."""
    config = {**base.unet.config, "sample_size": 64}
    net = PromptNet(config, text_dim=32, image_dim=4, arch=PromptNetArch(k=k))
    assert net.num_tokens() == n
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        s = net(x, torch.tensor(10), torch.randn(1, 5, 4), x)
    assert s.shape == (1, n, 32)
    assert net.num_tokens(128) == 4 * n  # twice the latent side: four times the tokens


def test_promptnet_backbone_starts_as_the_unets_encoder_half(base):
    net = PromptNet.from_unet(base.unet, 32, 4, PromptNetArch())
    unet = base.unet.state_dict()
    own = net.backbone.state_dict()
    assert own and all(torch.equal(v, unet[k]) for k, v in own.items())
    assert not any(k.startswith("up_blocks") for k in own)


def _subject(base, photo):
    enc = load_image_encoder("vae", base)
    net = PromptNet.from_unet(base.unet, base.text_encoder.config.hidden_size, enc.hidden_size, PromptNetArch()).eval()
    with torch.no_grad():
        x0, tokens = reference_inputs(photo, base.vae, enc, base.resolution)
    return PromptNetSubject.fixed(net, "sks", x0, tokens)


def test_fusion_sampling_batches_two_in_the_fusion_stage(base):
    """K = 1 with w2 > 0, two prompts x two images: the fusion stage runs the UNet on a batch of
    2 per image (∅, C^γ), the refinement on 3 (∅, C, C̃); PromptNet runs once per stage."""
    from PIL import Image

    pipe = base.pipeline()
    subject = _subject(base, Image.new("RGB", (40, 40), (200, 30, 30)))
    fp = FusionPipeline(pipe, identifier="sks", class_noun="dog", subject=subject)
    batches, promptnet_calls = [], []
    h1 = pipe.unet.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    h2 = subject.promptnet.register_forward_pre_hook(lambda m, a: promptnet_calls.append(a[0].shape[0]))
    params = FusionParams(num_inference_steps=3, refine_step=1, guidance_scale_ref=5.0, guidance_scale=7.0)
    images = fp(["a [S*] on the beach", "a photo of a dog"], num_images_per_prompt=2, params=params,
                generator=torch.Generator().manual_seed(0)).images
    h1.remove(), h2.remove()
    assert not pipe.text_encoder.embeddings._forward_hooks  # the request's hook is gone
    assert len(images) == 4 and images[0].size == (32, 32)
    assert batches == [8, 12] * 3
    assert promptnet_calls == [4, 4] * 3  # S* for every image; only the first prompt's two take it


def test_reference_prompt_puts_the_class_noun_in_the_identifiers_place():
    assert reference_prompt("a sks dog on the beach", "sks", "dog") == "a dog on the beach"
    assert reference_prompt("a photo of sks", "sks", "teddy bear") == "a photo of teddy bear"
    assert reference_prompt("sks teddy bear", "sks", "teddy bear") == "teddy bear"


def test_fusion_params_refuse_unknown_names():
    from dreamfleet.core.errors import ConfigError

    assert FusionParams.from_request({"refine_step": 1}).refine_step == 1
    with pytest.raises(ConfigError, match="guidance"):
        FusionParams.from_request({"guidance": 3})


def test_v_prediction_is_converted_to_epsilon(base):
    """A v-prediction UNet sampled through ε: with x_t = sqrt(ā)x0 + sqrt(1−ā)ε and the
    exact v, the converted output is ε."""
    config = {**base.noise_scheduler.config, "prediction_type": "v_prediction"}
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 1, 4, 16, 16, generator=g)
    t = torch.tensor(500)
    sampler = FusionSampler(None, config, FusionParams(num_inference_steps=4))
    a = sampler.scheduler.alphas_cumprod[500]
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0

    class Exact(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, return_dict=False):
            return (v.repeat(x.shape[0], 1, 1, 1),)

    sampler.unet = Exact()
    (out,) = sampler.eps(xt, t, [torch.zeros(1, 2, 3)])
    torch.testing.assert_close(out, eps, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from helpers import manifest_with_a_broken_subject

    return manifest_with_a_broken_subject(tmp_path_factory.mktemp("profusion"))


def pn_config(**kw):
    from dreamfleet.trainers.profusion import PromptNetConfig

    return PromptNetConfig(**{"steps": 4, "batch_size": 4, "learning_rate": 1e-4, "checkpoint_every": 2, **kw})


@pytest.fixture(scope="module")
def promptnet(manifest, tmp_path_factory):
    from dreamfleet.trainers.profusion import pretrain_promptnet

    out = tmp_path_factory.mktemp("pn") / "promptnet"
    info = pretrain_promptnet(manifest, "tiny-random", pn_config(), out, progress=False)
    return out, info


def _grads(modules: dict[str, torch.nn.Module]) -> dict[str, set[str]]:
    return {name: {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            for name, m in modules.items()}


def test_pretraining_reads_the_manifest_skips_the_broken_subject_and_records(promptnet):
    out, info = promptnet
    assert info.dataset["subjects"] == 3 and info.dataset["images"] == 9
    assert list(info.dataset["skipped"]) == ["broken"] and "hash" in info.dataset["skipped"]["broken"]
    assert info.train_stats["steps"] == 4 and info.config["steps"] == 4 and info.code_version
    assert info.base_model["spec"] == "tiny-random" and info.arch["image_encoder"] == "vae"
    assert (out / "promptnet.safetensors").is_file() and not (out.parent / ".promptnet.work").exists()


def test_pretraining_sends_gradients_to_promptnet_only(manifest):
    from dreamfleet.trainers.profusion import ProFusionObjective, manifest_photos, prepare

    base = load_base("tiny-random")
    photos, nouns, _ = manifest_photos(manifest)
    p = prepare(base, pn_config(), None, "sks", photos, nouns, "other")
    loss, metrics = ProFusionObjective(p).loss(0, 0)
    loss.backward()
    assert set(metrics) == {"loss", "mse", "s_star_norm"}
    grads = _grads({"promptnet": p.promptnet, **base.modules()})
    trainable = {n for n, q in p.promptnet.named_parameters()}
    assert grads["promptnet"] and grads["promptnet"] <= trainable
    assert len(grads["promptnet"]) > 0.9 * len(trainable)  # the backbone, the x_t branch, heads, output
    assert all(not g for name, g in grads.items() if name != "promptnet")
    assert all(p.refs[i] != [i] for i in range(len(photos)))  # another photo of the subject as the reference


def test_customisation_trains_promptnet_and_the_unets_qkv_only(promptnet):
    from PIL import Image

    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import CustomizeConfig, ProFusionObjective, prepare_customization

    subject = SubjectData("ball", "ball", [Image.new("RGB", (48, 48), (250, 200, 0))])
    p, _ = prepare_customization(subject, "tiny-random", CustomizeConfig(steps=2, views=3, promptnet=str(promptnet[0])))
    loss, _ = ProFusionObjective(p, train_qkv=True).loss(0, 0)
    loss.backward()
    grads = _grads({"promptnet": p.promptnet, **p.base.modules()})
    assert grads["promptnet"]
    assert grads["unet"] and all("lora" in n and n.split(".")[-4] in ("to_q", "to_k", "to_v") for n in grads["unet"])
    assert {n.split(".")[-4] for n in grads["unet"]} == {"to_q", "to_k", "to_v"}
    assert not grads["vae"] and not grads["text_encoder"]
    assert len(p.mean) == 4 and p.refs[0] == [0, 1, 2, 3]  # the photo and 3 views; references drawn from all


def test_promptnet_may_learn_at_its_own_rate_and_by_default_shares_one_group(promptnet):
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.loop import LocalEngine
    from dreamfleet.trainers.profusion import (
        CustomizeConfig,
        ProFusionObjective,
        loop_settings,
        prepare_customization,
    )

    subject = SubjectData("ball", "ball", [Image.new("RGB", (48, 48), (250, 200, 0))])
    c = CustomizeConfig(steps=2, views=1, learning_rate=1e-3, promptnet_learning_rate=2e-5,
                        promptnet=str(promptnet[0]))
    p, _ = prepare_customization(subject, "tiny-random", c)
    engine = LocalEngine(obj := ProFusionObjective(p, train_qkv=True), loop_settings(p, "t", progress=False))
    lora, net = engine.optimizer.param_groups
    assert (lora["lr"], net["lr"]) == (1e-3, 2e-5)
    assert {id(x) for x in net["params"]} == {id(x) for x in p.promptnet.parameters()}
    assert all("lora" in n for n, x in p.base.unet.named_parameters() if any(x is y for y in lora["params"]))
    engine.backward(obj.loss(0, 0)[0])
    assert engine.step()["lr"] == 1e-3  # the config's rate is the one reported
    q = dataclasses.replace(p, cfg=dataclasses.replace(c, promptnet_learning_rate=None))
    one = LocalEngine(ProFusionObjective(q, train_qkv=True), loop_settings(q, "t", progress=False))
    assert len(one.optimizer.param_groups) == 1 and one.optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="promptnet_learning_rate"):
        CustomizeConfig(promptnet_learning_rate=0.0)


def test_customised_expert_is_sampled_with_fusion_sampling(promptnet, tmp_path):
    from dreamfleet.core.expert import ExpertInfo, open_expert
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import CustomizeConfig, customize_subject

    photo = Image.new("RGB", (40, 40), (20, 120, 220))
    subject = SubjectData("blue", "ball", [photo])
    info, _ = customize_subject(subject, "tiny-random", CustomizeConfig(steps=3, views=3, promptnet=str(promptnet[0])),
                             tmp_path / "expert", progress=False)
    assert info.method == "profusion" and info.num_images == 1 and info.identifier == promptnet[1].placeholder_token
    assert info.train_stats["qkv_lora_bytes"] > 0 and info.train_stats["views"] == 4
    assert ExpertInfo.read(tmp_path / "expert").config["promptnet"] == str(promptnet[0])
    pipe, _ = open_expert(tmp_path / "expert")
    assert isinstance(pipe, FusionPipeline) and pipe.subject.promptnet.num_tokens(16) == 1
    images = pipe("a [S*] ball on the beach", num_images_per_prompt=2,
                  params=FusionParams(num_inference_steps=3, refine_step=1), generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (32, 32)
    big = pipe("a [S*] ball", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert big.images[0].size == (64, 64) and pipe.subject.promptnet.num_tokens(32) == 4  # S* follows the latent


def test_customisation_refuses_what_it_cannot_use(promptnet, tmp_path):
    from dreamfleet.core.errors import ConfigError
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import CustomizeConfig, customize_subject

    subject = SubjectData("blue", "ball", [Image.new("RGB", (40, 40), (20, 120, 220))])
    with pytest.raises(ConfigError, match="--promptnet"):
        customize_subject(subject, "tiny-random", CustomizeConfig(steps=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="pre-trained on base 'tiny-random'"):
        customize_subject(subject, "tiny-sdxl", CustomizeConfig(steps=1, promptnet=str(promptnet[0])), tmp_path / "b")
    with pytest.raises(ConfigError, match="ProFusion does not support"):
        from dreamfleet.trainers.profusion import pretrain_promptnet

        pretrain_promptnet(promptnet[1].dataset["uri"], "tiny-sdxl", pn_config(), tmp_path / "c")


def test_pretraining_resumes_where_it_stopped(manifest, promptnet, tmp_path):
    """Stopped after step 2 and run again: the same PromptNet as the uninterrupted run."""
    from safetensors.torch import load_file

    from dreamfleet.trainers.loop import LoopHooks
    from dreamfleet.trainers.profusion import Stopped, pretrain_promptnet

    out = tmp_path / "pn"
    seen = []
    stop = LoopHooks(on_step=lambda step, m: seen.append(step), should_stop=lambda: len(seen) >= 2)
    with pytest.raises(Stopped, match="stopped at step 2 of 4"):
        pretrain_promptnet(manifest, "tiny-random", pn_config(), out, progress=False, hooks=stop)
    info = pretrain_promptnet(manifest, "tiny-random", pn_config(), out, progress=False)
    assert info.train_stats["resumed_from"] == 2
    a, b = load_file(str(out / "promptnet.safetensors")), load_file(str(promptnet[0] / "promptnet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_pretrain_then_train_subject_method_profusion(manifest, tmp_path, capsys):
    """The two commands through the CLI's main, in this process (test_cli.py checks a real
    process's exit status; two more interpreters here cost ~40 s)."""
    from helpers import subject_folder

    from dreamfleet.cli.main import main
    from dreamfleet.core.expert import ExpertInfo

    assert main(["profusion", "pretrain", manifest, "--out", str(tmp_path / "pn"), "--base-model", "tiny-random",
                 "--steps", "2", "--batch-size", "2", "--subjects", "dog1,cat1,broken", "--local"]) == 0
    said = capsys.readouterr()
    assert "2 subjects, 6 photos" in said.out and "skipped broken" in said.out, said
    photos = subject_folder(tmp_path, "teddy", n=2)
    one_photo = ["train-subject", "--images", str(photos), "--class-noun", "teddy bear", "--method", "profusion"]
    assert main([*one_photo, "--promptnet", str(tmp_path / "pn"), "--steps", "2", "--views", "3",
                 "--out", str(tmp_path / "expert")]) == 0, capsys.readouterr().err[-2000:]
    info = ExpertInfo.read(tmp_path / "expert")
    assert info.method == "profusion" and info.num_images == 1 and info.class_images is None
    assert "num_class_images" not in info.config and info.config["views"] == 3  # the customisation's own config
    assert info.config["prompt"] == "a {placeholder} {class_noun}" and info.config["learning_rate"] == 2e-5
    capsys.readouterr()
    assert main([*one_photo, "--out", str(tmp_path / "none")]) == 2
    assert "--promptnet" in capsys.readouterr().err


def test_serving_engine_renders_a_profusion_expert_beside_a_dreambooth_one(promptnet, tmp_path):
    """The engine hot-swaps a ProFusion expert's q/k/v adapter like any LoRA expert and samples
    it with Fusion Sampling; the DreamBooth expert on the same base is unaffected by it."""
    from helpers import fast_config

    from dreamfleet.registry import Registry
    from dreamfleet.serving.engine import ExpertEngine, GenItem
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.fit import train_subject
    from dreamfleet.trainers.profusion import CustomizeConfig, customize_subject

    reg = Registry(tmp_path / "reg")
    photo = Image.new("RGB", (40, 40), (20, 120, 220))
    customize_subject(SubjectData("blue", "ball", [photo]), "tiny-random",
                      CustomizeConfig(steps=2, views=2, promptnet=str(promptnet[0])), tmp_path / "pf", progress=False)
    reg.publish("blue", tmp_path / "pf")
    db = train_subject(SubjectData("red", "ball", [Image.new("RGB", (40, 40), (220, 20, 20))] * 3), "tiny-random",
                       fast_config(steps=2, with_prior_preservation=False), tmp_path / "db", progress=False)
    reg.publish("red", db.expert_dir)
    engine = ExpertEngine(str(tmp_path / "reg"), device="cpu")
    item = GenItem("a [V] ball on the beach", 2, steps=3, guidance_scale=5.0, seed=0, width=32, height=32)
    before = engine.generate("red", "v0001", [item])[0]
    info = reg.expert_info("blue")
    fused = engine.generate("blue", "v0001", [GenItem(info.prompt(item.prompt), 2, 3, 5.0, 0, 32, 32)])[0]
    after = engine.generate("red", "v0001", [item])[0]
    assert len(fused) == 2 and fused[0].size == (32, 32)
    assert [np.asarray(a).tobytes() for a in before] == [np.asarray(a).tobytes() for a in after]
    assert not engine.base("tiny-random").text_encoder.embeddings._forward_hooks


def test_fanout_customises_one_photo_subjects_next_to_a_broken_one(manifest, promptnet, tmp_path, ray_local):
    """A manifest customised with method=profusion through the fan-out; the corrupt subject
    fails alone; packing (LoRA adapters only) is refused up front."""
    from helpers import fast_config

    from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
    from dreamfleet.registry import Registry

    c = fast_config(method="profusion", promptnet=str(promptnet[0]), steps=2, views=2, checkpoint_every=1)
    from dreamfleet.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--pack 4 packs LoRA adapters"):
        run_fanout(manifest, str(tmp_path / "reg"), "tiny-random", c, FanoutConfig(pack=4), progress=False)
    summary = run_fanout(manifest, str(tmp_path / "reg"), "tiny-random", c, FanoutConfig(),
                         subjects=["dog1", "cat1", "broken"], progress=False)
    assert sorted(summary.done) == ["cat1", "dog1"] and list(summary.failed) == ["broken"]
    reg = Registry(tmp_path / "reg")
    for sid in summary.done:
        info = reg.expert_info(sid)
        assert info.method == "profusion" and info.num_images == 1 and info.train_stats["steps"] == 2
        assert "packed" not in info.train_stats and info.identifier == promptnet[1].placeholder_token
    assert summary.class_images_generated == 0


def test_pretraining_on_ray_train_with_two_ddp_workers(manifest, tmp_path, ray_local):
    """The same loop on a Ray Train worker group of 2 (DDP): rank 0 publishes; each rank draws
    its own batches, so the result differs from one process's but trains the same modules."""
    from safetensors.torch import load_file

    from dreamfleet.control.cluster import EncoderRuntime
    from dreamfleet.control.profusion import pretrain

    info = pretrain(manifest, "tiny-random", pn_config(steps=2, checkpoint_every=1), tmp_path / "pn",
                    EncoderRuntime(workers=2))
    assert info.train_stats["world_size"] == 2 and info.train_stats["steps"] == 2
    assert list(info.dataset["skipped"]) == ["broken"]
    state = load_file(str(tmp_path / "pn" / "promptnet.safetensors"))
    assert state and all(torch.isfinite(v).all() for v in state.values())


# --------------------------------------------------------------------------- the toy comparison


def test_toy_comparison_runs_every_stage_for_a_few_steps(tmp_path):
    """`dreamfleet profusion compare`'s stages, tiny: pre-training, every row, the sweep, the table."""
    from dreamfleet.eval.profusion_bench import ProFusionBenchConfig, run_profusion_bench

    c = ProFusionBenchConfig(subjects=["ball-ring"], train_subjects=3, pretrain_steps=2, pretrain_batch=2,
                             customize_steps=2, customize_batch=2, views=1,
                             dreambooth={"steps": 2, "num_class_images": 2, "class_generation_steps": 2},
                             images_per_prompt=1, num_inference_steps=2, sweep={"refine_emb_scale": [0.4]})
    summary = run_profusion_bench(tmp_path, c)
    labels = summary["labels"]
    assert list(labels) == ["base", "DreamBooth+prior (5 photos)", "DreamBooth+prior, Fusion Sampling",
                            "ProFusion (1 photo, Fusion Sampling)", "ProFusion K=0", "ProFusion + L2 on S* (K=0)",
                            "sweep refine_emb_scale=0.4"]
    pf = labels["ProFusion (1 photo, Fusion Sampling)"]
    assert 0 <= pf["subject_fidelity"] <= 1 and pf["personalise_s"] > 0 and pf["first_image_s"] >= pf["personalise_s"]
    assert set(summary["targets"]) == {"similarity_vs_dreambooth", "prompt_fidelity_vs_base",
                                       "time_ratio_vs_dreambooth", "fusion_vs_k0"}
    assert (tmp_path / "sweep.png").is_file() and "ProFusion K=0" in (tmp_path / "results.md").read_text()
    assert summary["promptnet"]["steps"] == 2


@pytest.mark.slow  # the whole comparison of docs/profusion.md, all eight subjects (~90 min on 2 cores)
def test_toy_comparison_full(artifacts_dir):
    from dreamfleet.eval.profusion_bench import run_profusion_bench

    summary = run_profusion_bench(artifacts_dir / "profusion")
    assert summary["targets"]


def test_a_clip_vision_folder_as_the_image_encoder(manifest, tmp_path):
    """Real SD bases take a CLIP vision model (a local folder here, built tiny from a config):
    its last_hidden_state tokens (patches + CLS) are PromptNet's image tokens."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from dreamfleet.core.errors import ConfigError
    from dreamfleet.core.expert import open_expert
    from dreamfleet.trainers.dreambooth import SubjectData
    from dreamfleet.trainers.profusion import CustomizeConfig, customize_subject, pretrain_promptnet

    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(tmp_path / "clip-vision")
    info = pretrain_promptnet(manifest, "tiny-random", pn_config(steps=1, image_encoder=str(tmp_path / "clip-vision")),
                              tmp_path / "pn", progress=False)
    assert info.image_dim == 24 and info.arch["image_encoder"] == str(tmp_path / "clip-vision")
    enc = load_image_encoder(str(tmp_path / "clip-vision"), load_base("tiny-random"))
    assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, 17, 24)  # 4x4 patches + CLS
    subject = SubjectData("blue", "ball", [Image.new("RGB", (40, 40), (20, 120, 220))])
    customize_subject(subject, "tiny-random", CustomizeConfig(steps=1, views=1, promptnet=str(tmp_path / "pn")),
                      tmp_path / "expert", progress=False)
    pipe, _ = open_expert(tmp_path / "expert")
    assert pipe("a [S*] ball", num_inference_steps=2).images[0].size == (32, 32)
    with pytest.raises(ConfigError, match="not a CLIPVisionModel folder"):
        load_image_encoder(str(tmp_path / "missing"), load_base("tiny-random"))


def test_compare_takes_the_customisation_recipe_from_flags(monkeypatch, tmp_path):
    """`dreamfleet profusion compare --customize-steps/--customize-lr/--qkv-rank`: the faster
    recipe of docs/profusion.md is one command."""
    from dreamfleet.cli.main import main
    from dreamfleet.eval import profusion_bench

    seen = {}

    def fake_bench(out, c):
        seen["c"] = c
        return {"wall_s": 0.0, "targets": {}}

    monkeypatch.setattr(profusion_bench, "run_profusion_bench", fake_bench)
    assert main(["profusion", "compare", "--out", str(tmp_path), "--subjects", "ball-halves", "--customize-steps",
                 "80", "--customize-lr", "2.5e-3", "--qkv-rank", "32"]) == 0
    c = seen["c"]
    assert (c.customize_steps, c.customize_lr, c.qkv_rank, c.subjects) == (80, 2.5e-3, 32, ["ball-halves"])
    assert profusion_bench.ProFusionBenchConfig().qkv_rank == 8  # the defaults stay the quality recipe
