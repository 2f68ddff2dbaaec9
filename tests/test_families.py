"""Model families beyond SD 1.x/2.x (SDXL, SD3, Flux.1, Z-Image) through the trainer, packing,
resume, eval and the stock diffusers pipelines, on tiny models built in code (nothing is
downloaded). Each family is one parametrisation: adding one is a module plus a SPECS entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_within_noise, curve_spread, fast_config, picture, torch_threads, weight_gap
from safetensors.torch import load_file

from dreamfleet.core.errors import ConfigError, ModelError
from dreamfleet.core.expert import open_expert
from dreamfleet.core.families import all_families, get_family
from dreamfleet.core.models import load_base
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData, work_dir_for
from dreamfleet.trainers.fit import train_packed, train_subject

WEIGHTS = "pytorch_lora_weights.safetensors"
SPECS = {"sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux", "zimage": "tiny-zimage"}
STOCK = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
         "zimage": "ZImagePipeline"}
SEEDS = (0, 1)


def subject(i: int) -> SubjectData:
    return SubjectData(f"dog{i}", "dog", [picture(10 * i + j, size=(64, 48)) for j in range(3)])


def config(seed: int = 0, **kw):
    return fast_config(**{"steps": 6, "learning_rate": 1e-2, "seed": seed, **kw})


@pytest.fixture(scope="module", params=sorted(SPECS))
def family(request, tmp_path_factory):
    """One family's solo runs (at 1 and 2 torch threads: the summation-order noise) and packed run."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    cache = ClassImageCache(root / "cache")
    out = {"name": name, "spec": SPECS[name], "root": root, "cache": cache}
    for n in (1, 2):
        with torch_threads(n):
            out[f"solo{n}"] = [train_subject(subject(i), SPECS[name], config(s), root / f"solo{i}-t{n}",
                                             class_cache=cache, progress=False) for i, s in enumerate(SEEDS)]
    with torch_threads(1):
        out["packed"] = train_packed([subject(i) for i in range(len(SEEDS))], SPECS[name],
                                     [config(s) for s in SEEDS], [root / f"packed{i}" for i in range(len(SEEDS))],
                                     class_cache=cache, progress=False)
    return out


def weights(results) -> dict[str, torch.Tensor]:
    return {f"{r.info.subject_id}/{k}": v for r in results for k, v in load_file(str(r.expert_dir / WEIGHTS)).items()}


def test_a_lora_expert_trains_and_records_its_family(family):
    r = family["solo1"][0]
    assert r.info.base_model["family"] == family["name"] and r.info.method == "lora"
    denoiser = get_family(family["name"]).denoiser
    keys = load_file(str(r.expert_dir / WEIGHTS)).keys()
    assert keys and all(k.startswith(f"{denoiser}.") for k in keys)
    losses = [h["loss"] for h in r.loop.history]
    assert len(losses) == 6 and all(np.isfinite(losses)) and "loss_prior" in r.loop.history[0]


def test_it_packs_with_another_subject_to_the_solo_result(family):
    one, two, packed = family["solo1"], family["solo2"], family["packed"]
    noise = weight_gap(weights(one), weights(two))
    assert_within_noise(weight_gap(weights(one), weights(packed)), noise, f"{family['name']} packed vs solo")
    for a, b, c in zip(one, two, packed, strict=True):
        spread = curve_spread([h["loss"] for h in a.loop.history], [h["loss"] for h in b.loop.history])
        gap = curve_spread([h["loss"] for h in a.loop.history], [h["loss"] for h in c.loop.history])
        assert gap <= 10 * spread, (a.info.subject_id, gap, spread)


def test_it_resumes_to_identical_weights(family, tmp_path):
    cfg = fast_config(steps=8, checkpoint_every=4, learning_rate=1e-2)
    kw = {"class_cache": family["cache"], "progress": False}
    straight = train_subject(subject(0), family["spec"], cfg, tmp_path / "a", **kw)

    def crash(step, metrics):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_subject(subject(0), family["spec"], cfg, tmp_path / "b", on_step=crash, **kw)
    assert (work_dir_for(tmp_path / "b") / "checkpoints" / "step-00000004").is_dir()
    resumed = train_subject(subject(0), family["spec"], cfg, tmp_path / "b", **kw)
    assert resumed.loop.resumed_from == 4
    wa, wb = load_file(str(tmp_path / "a" / WEIGHTS)), load_file(str(tmp_path / "b" / WEIGHTS))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["loss"] for h in straight.loop.history] == [h["loss"] for h in resumed.loop.history]


def _render(pipe, prompt: str) -> np.ndarray:
    with torch.inference_mode():
        return pipe(prompt, num_inference_steps=3, guidance_scale=3.5, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def own_memory(pipe) -> None:
    """Copy every weight out of the safetensors mmap. Loaded weights sit at the file's offsets
    (24 bytes past a 64-byte boundary here), and CPU kernels pick another summation order for
    unaligned data: the Flux transformer's output moved by 3.6e-7 with equal weights until copied."""
    with torch.no_grad():
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                for param in module.parameters():
                    param.data = param.data.clone()


def test_it_loads_in_the_stock_pipeline_with_identical_output(family):
    """The base saved as a plain diffusers folder, the family's stock pipeline class,
    ``load_lora_weights(expert)``: the same pixels as dreamfleet's own expert pipeline."""
    import diffusers

    expert = family["solo1"][0]
    folder = family["root"] / "stock-base"
    load_base(family["spec"]).save_pretrained(folder)
    stock = getattr(diffusers, STOCK[family["name"]]).from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    own_memory(stock)
    ours, info = open_expert(expert.expert_dir)
    stock.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    before = _render(stock, info.instance_prompt)
    stock.load_lora_weights(str(expert.expert_dir))
    denoiser = getattr(stock, get_family(family["name"]).denoiser)
    saved = {k.split(".", 1)[1].rsplit(".lora", 1)[0] for k in load_file(str(expert.expert_dir / WEIGHTS))}
    adapted = {n for n, m in denoiser.named_modules() if getattr(m, "lora_A", None)}
    assert adapted == saved  # every saved adapter layer is loaded, none dropped
    theirs = _render(stock, info.instance_prompt)
    assert np.abs(theirs - before).max() > 1e-3  # the adapter changes the picture
    assert np.array_equal(theirs, _render(ours, info.instance_prompt))


def test_eval_renders_each_family_expert_at_its_native_size(family):
    """What `dreamfleet eval` renders: the expert's pipeline at the base's native side, noise seed
    ``seed + j`` per image, paired across models."""
    from dreamfleet.eval.evaluate import EvalConfig, generate

    pipe, info = open_expert(family["solo1"][0].expert_dir)
    c = EvalConfig(num_inference_steps=2)
    images = generate(pipe, [info.instance_prompt], 2, c)
    assert [im.size for im in images[0]] == [(32, 32)] * 2
    again = generate(pipe, [info.instance_prompt], 2, c)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images[0], again[0], strict=True))


def test_sdxl_trains_text_encoder_lora_on_both_encoders_and_full(tmp_path):
    kw = {"class_cache": ClassImageCache(tmp_path / "cache"), "progress": False}
    r = train_subject(subject(0), "tiny-sdxl", config(train_text_encoder=True), tmp_path / "te", **kw)
    prefixes = {k.split(".")[0] for k in load_file(str(r.expert_dir / WEIGHTS))}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    pipe, _ = open_expert(r.expert_dir)
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    full = train_subject(subject(0), "tiny-sdxl", config(method="full", learning_rate=1e-3), tmp_path / "full", **kw)
    assert full.info.weights == ["unet"] and (full.expert_dir / "unet" / "config.json").is_file()
    losses = [h["loss_instance"] for h in full.loop.history]
    assert losses[-1] < losses[0]


def test_an_sdxl_folder_trains_from_the_cli(tmp_path):
    """A local SDXL diffusers folder given to --base-model is detected from its model_index.json."""
    from dreamfleet.cli.main import main
    from dreamfleet.core.expert import ExpertInfo

    base = tmp_path / "sdxl-base"
    load_base("tiny-sdxl").save_pretrained(base)
    assert load_base(str(base)).family == "sdxl"
    images = tmp_path / "teddy"
    images.mkdir()
    for i in range(3):
        picture(i).save(images / f"{i}.png")
    code = main(["train-subject", "--images", str(images), "--class-noun", "teddy", "--base-model", str(base),
                 "--out", str(tmp_path / "expert"), "--class-cache", str(tmp_path / "cache"), "--steps", "2",
                 "--num-class-images", "2", "--class-generation-steps", "2", "--validation-inference-steps", "2"])
    assert code == 0
    assert ExpertInfo.read(tmp_path / "expert").base_model["family"] == "sdxl"


def test_what_a_family_cannot_do_is_refused_saying_why(tmp_path):
    kw = {"class_cache": ClassImageCache(tmp_path / "cache"), "progress": False}
    with pytest.raises(ConfigError, match=r"Flux.1.*method=full is not supported"):
        train_subject(subject(0), "tiny-flux", config(method="full"), tmp_path / "x", **kw)
    from dreamfleet.trainers.apprentice import check_apprentice_base

    with pytest.raises(ConfigError, match="apprentice does not support"):
        check_apprentice_base(load_base("tiny-sdxl"))


def test_an_unknown_pipeline_class_names_the_supported_ones(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ModelError, match=r"KandinskyPipeline.*StableDiffusionXLPipeline"):
        load_base(str(tmp_path))


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_flow_matching_maths_is_diffusers(scheme):
    """x_t = (1 - σ) x0 + σ noise, target noise - x0, and diffusers' own weighting of σ."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    base = load_base("tiny-flux", fresh=False)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    b = base.kind.noisy_batch(base, config(weighting_scheme=scheme), x0, noise, torch.Generator().manual_seed(3))
    sched = base.noise_scheduler
    idx = [int((sched.timesteps == t).nonzero()) for t in b.timesteps]
    sigma = sched.sigmas[idx].view(-1, 1, 1, 1)
    assert torch.allclose(sigma * 1000, b.timesteps.view(-1, 1, 1, 1), rtol=1e-5)  # Flux's timesteps are 1000 σ
    assert torch.allclose(b.noisy, (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(b.target, noise - x0)
    assert torch.allclose(b.weighting, compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigma))


def test_every_family_says_what_it_supports():
    for family in all_families().values():
        for value in vars(family.support).values():
            assert value == "yes" or value.startswith("no: "), (family.name, value)


def test_memory_features_train_the_same_kind_of_expert(tmp_path):
    """On CPU: gradient checkpointing gives the same weights; an NF4-quantised frozen base
    (QLoRA) and 8-bit AdamW (bitsandbytes) train adapters that load in the unquantised stock
    pipeline; the 8-bit optimizer's moments are uint8 and a resumed run matches an unbroken one."""
    import bitsandbytes as bnb

    from dreamfleet.trainers.dreambooth import prepare_subject, setup_trainable

    kw = {"class_cache": ClassImageCache(tmp_path / "cache"), "progress": False}
    plain = train_subject(subject(0), "tiny-flux", config(), tmp_path / "plain", **kw)
    ckpt = train_subject(subject(0), "tiny-flux", config(gradient_checkpointing=True), tmp_path / "ckpt", **kw)
    wa, wb = load_file(str(plain.expert_dir / WEIGHTS)), load_file(str(ckpt.expert_dir / WEIGHTS))
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)

    p = prepare_subject(subject(0), "tiny-flux", config(quantize_base="nf4"), class_cache=kw["class_cache"])
    setup_trainable(p)
    frozen = [m for n, m in p.base.transformer.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n]
    assert frozen and all(isinstance(m, bnb.nn.Linear4bit) for m in frozen)
    q = train_subject(subject(0), "tiny-flux", config(quantize_base="nf4"), tmp_path / "nf4", **kw)
    assert load_file(str(q.expert_dir / WEIGHTS)).keys() == wa.keys()
    assert all(np.isfinite(h["loss"]) for h in q.loop.history)

    cfg8 = fast_config(steps=8, checkpoint_every=4, learning_rate=1e-2, optimizer="adamw8bit")
    straight = train_subject(subject(0), "tiny-flux", cfg8, tmp_path / "a8", **kw)

    def crash(step, metrics):
        if step == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_subject(subject(0), "tiny-flux", cfg8, tmp_path / "b8", on_step=crash, **kw)
    assert (work_dir_for(tmp_path / "b8") / "checkpoints" / "step-00000004" / "optimizer.pt").is_file()
    resumed = train_subject(subject(0), "tiny-flux", cfg8, tmp_path / "b8", **kw)
    w1, w2 = load_file(str(straight.expert_dir / WEIGHTS)), load_file(str(resumed.expert_dir / WEIGHTS))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # bitsandbytes keeps tensors under 4096 elements (the tiny adapters) in 32 bits; a real one is 8-bit:
    from dreamfleet.trainers.loop import LoopSettings, make_optimizer

    param = torch.nn.Parameter(torch.randn(4, 3072))  # one rank-4 LoRA A of Flux's 3072-wide layers
    opt = make_optimizer([param], LoopSettings(cfg8, cfg8, autocast_dtype=None, device=torch.device("cpu")))
    param.grad = torch.randn_like(param)
    opt.step()
    assert isinstance(opt, bnb.optim.AdamW8bit) and opt.state[param]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_hub_id_resolves_to_its_family_from_the_hub_cache(name, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's snapshot resolution (here offline, from a cache
    laid out as the hub writes it) and the folder's model_index.json names the family; an id
    that is not cached gets the clear error."""
    cache = tmp_path / "hub"
    snapshot = cache / f"models--acme--{name}" / "snapshots" / ("0" * 40)
    load_base(SPECS[name]).save_pretrained(snapshot)
    (cache / f"models--acme--{name}" / "refs").mkdir()
    (cache / f"models--acme--{name}" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    base = load_base(f"acme/{name}")
    assert base.family == name and base.spec == f"acme/{name}"
    with pytest.raises(ModelError, match="could not be found in the local Hugging Face cache"):
        load_base("acme/not-cached")


def test_a_rare_identifier_is_found_in_a_byte_level_vocabulary():
    """Z-Image's Qwen tokenizer is byte-level BPE (``Ġsks``, not CLIP's ``sks</w>``): the rare
    single-token identifier search finds the late-merged 3-letter words there too."""
    from dreamfleet.core.identifiers import check_identifier, choose_identifier, rare_token_candidates

    tok = load_base("tiny-zimage", fresh=False).tokenizer
    rare = rare_token_candidates(tok)
    assert rare and set(rare) <= {"sks", "zwx", "qlo", "vyk", "xjr", "pqd", "kzv", "bnq", "wuf", "yxo", "jhv", "zqp",
                                  "fep", "dax", "lix", "mog", "nuv", "rox", "sib", "tep", "vod", "wex", "yun", "zor",
                                  "kav", "gip", "hux", "jol", "kem", "lun", "mip", "nog", "piv", "quz", "rad", "suf",
                                  "tiv", "uxo", "vep", "wib"}
    assert check_identifier(tok, choose_identifier(tok, "dog0")) in rare
