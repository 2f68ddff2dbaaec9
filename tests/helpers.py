"""Small builders shared by the tests (pictures, subjects, fast configs)."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def picture(seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB") -> Image.Image:
    """A deterministic picture with structure (a coloured disc on a gradient), not pure noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3)[None, None, :]
    arr = np.broadcast_to(base, (h, w, 3)).astype(np.uint8).copy()
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 4, 3 * h // 4), min(w, h) // 4
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img.convert(mode) if mode != "RGB" else img


def subject_folder(root: Path, name: str = "dog1", n: int = 4, seed: int = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        picture(seed * 100 + i).save(folder / f"{i:02d}.jpg", quality=95)
    return folder


def fast_config(**overrides):
    """A TrainConfig small enough for a CPU test: few steps, few class images, 2 denoising steps."""
    from dreamfleet.trainers.config import TrainConfig

    kw = dict(
        steps=8, num_class_images=4, class_generation_steps=2, validation_inference_steps=2,
        num_validation_images=1, validation_prompts=["a {identifier} {class_noun}"],
        checkpoint_every=0, validation_every=0, learning_rate=1e-3,
    )
    kw.update(overrides)
    return TrainConfig(**kw)


def prefilled_class_cache(root: Path, cfg, nouns=("dog", "cat")) -> str:
    """A class-image cache already holding ``cfg``'s class images of ``nouns`` for tiny-random
    (made in process, ~1 s): a fan-out that finds them skips its Ray Data job (~20-30 s of
    actor start-up on 2 cores), as a fleet's later runs do."""
    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest

    base = load_base("tiny-random")
    c = cfg.resolve(native_resolution=base.resolution)
    for noun in nouns:
        req = ClassImageRequest.for_config(c, c.class_prompt.format(class_noun=noun, identifier=""))
        ClassImageCache(root).ensure(base, req)
    return str(root)


def wait_healthy(url: str, timeout_s: float = 120) -> None:
    """Poll ``url``/healthz until it answers 200 (a Serve app that is still starting)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f} s")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers started by a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- float32 noise
#
# Two computations of the same maths that sum in another order (another batch shape, another
# kernel, another thread count) differ by rounding; training amplifies that, because Adam
# divides each element's gradient by sqrt(v): an element whose gradient is at rounding level
# (cancellation) can move by a good fraction of lr in one run and not the other. So what two
# such runs may differ by is not a constant of float32: it depends on the model, the data, the
# steps and the machine's kernels. The tests measure it instead, on the machine they run on:
# the reference is the same solo run at 1 and at 2 torch threads (a change of summation order
# only), and a comparison passes within NOISE_MARGIN times that spread, statistic by statistic.
#
# NOISE_MARGIN = 10. Measured on a 2-core AMD EPYC (2026-12-02, tests/test_packing.py's runs):
# packed vs solo at the same thread count is 0.9-2.4x the thread spread (max per-tensor
# relative norm 5.3e-4 and 1.3e-3 against a spread of 5.5e-4); one clip for the whole pack
# instead of one per subject (a real error) is 40x the spread on the max per-tensor relative
# norm, 17x on the largest element and ~6000x on the median per-tensor relative norm.
#
# Curves and images are reductions whose last rounding alone moves them by an ulp or two, so
# their spread is floored at ROUNDING_FLOOR (4 ulp relative, 4.8e-7): the 1- and 2-thread
# losses measured 1 ulp apart, packed 1-4 ulp.
NOISE_MARGIN = 10.0
ROUNDING_FLOOR = 4 * float(np.finfo(np.float32).eps)


def weight_gap(a: dict, b: dict) -> dict[str, float]:
    """How far two state dicts of the same keys are apart: the median and the largest
    per-tensor relative norm ``|b-a| / |a|``, and the largest elementwise difference. A tensor
    that is zero in both (a LoRA up-projection no gradient reaches, as SD3's last context
    branch) agrees exactly: 0, not 0/0 (a NaN would make the sort, and so the maximum, arbitrary)."""
    assert a.keys() == b.keys() and a, (sorted(a)[:3], sorted(b)[:3])

    def rel_gap(x, y) -> float:
        diff, norm = float((y - x).norm()), float(x.norm())
        return diff / norm if norm else (0.0 if diff == 0 else float("inf"))

    rel = sorted(rel_gap(a[k], b[k]) for k in a)
    return {
        "median_rel": rel[len(rel) // 2],
        "max_rel": rel[-1],
        "max_abs": max(float((b[k] - a[k]).abs().max()) for k in a),
    }


def curve_gap(a, b) -> float:
    """The largest relative difference between two equally long curves (losses, norms)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape and a.size, (a.shape, b.shape)
    return float(np.max(np.abs(b - a) / np.abs(a)))


def curve_spread(one, two) -> float:
    """The spread of a curve between the 1- and 2-thread runs, floored at ROUNDING_FLOOR."""
    return max(curve_gap(one, two), ROUNDING_FLOOR)


def assert_within_noise(gap: dict[str, float], noise: dict[str, float], what: str) -> None:
    """Every statistic of ``gap`` is within NOISE_MARGIN times the same statistic of ``noise``
    (the spread of the same solo run at 1 and 2 threads, measured on this machine)."""
    for key, spread in noise.items():
        assert spread > 0, (
            f"{what}: the 1- and 2-thread solo runs agree exactly in {key}, so this machine shows no "
            "summation-order noise to derive a tolerance from; run the test on a machine with 2+ cores"
        )
        assert gap[key] <= NOISE_MARGIN * spread, (
            f"{what}: {key} {gap[key]:.3g} is over {NOISE_MARGIN:g}x the thread spread {spread:.3g}"
        )


@contextlib.contextmanager
def torch_threads(n: int):
    """``with torch_threads(n):`` runs the block with n intra-op threads, then restores them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plain_pipeline(expert_dir: Path, root: Path):
    """A full-weight expert in a plain diffusers ``StableDiffusionPipeline``, nothing of
    dreamfleet's loading involved: the tiny-random base as saved on disk, the expert's
    ``unet/`` and, when it has one, its trained ``text_encoder/``; the DPM-Solver sampler
    that serving, eval and gather use."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from dreamfleet.core.models import load_base

    sd = root / "plain-sd"
    if not sd.is_dir():
        load_base("tiny-random").save_pretrained(sd)
    parts = {"unet": UNet2DConditionModel.from_pretrained(expert_dir / "unet")}
    if (expert_dir / "text_encoder").is_dir():
        parts["text_encoder"] = CLIPTextModel.from_pretrained(expert_dir / "text_encoder")
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None, requires_safety_checker=False, **parts)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_pipeline(expert_dir: Path, root: Path):
    """A LoRA expert in its family's stock diffusers pipeline (``StableDiffusionXLPipeline``,
    ``FluxPipeline``, ...), nothing of dreamfleet's loading involved: the base as saved on disk,
    ``load_lora_weights(expert_dir)``, and the sampler serving uses (DPM-Solver for the UNet
    families, the base's flow-matching Euler for the DiTs)."""
    import json

    import diffusers

    from dreamfleet.core.models import load_base

    spec = json.loads((expert_dir / "expert.json").read_text())["base_model"]["spec"]
    folder = root / f"stock-{spec}"
    if not folder.is_dir():
        load_base(spec).save_pretrained(folder)
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder)
    if "Flow" not in type(pipe.scheduler).__name__:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(expert_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float = 7.5,
                    size: int | None = None) -> list[np.ndarray]:
    """8-bit RGB arrays of one pipeline call, one CPU generator per image (as serving seeds them)."""
    import torch

    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    kw = {"width": size, "height": size} if size else {}
    with torch.inference_mode():
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **kw).images
    return [np.asarray(im.convert("RGB"), dtype=np.int16) for im in images]


def manifest_with_a_broken_subject(root: Path) -> str:
    """A manifest of dog1, dog2, cat1 (3 photos each) and "broken", whose stored bytes are
    corrupted after the build (its content hash no longer matches)."""
    from dreamfleet.data.build import BuildConfig
    from dreamfleet.data.manifest import Manifest, build_from_folders

    src = root / "src"
    for i, name in enumerate(["dog1", "dog2", "cat1", "broken"]):
        subject_folder(src, name, n=3, seed=i)
    (src / "classes.csv").write_text("subject_id,class_noun\ndog1,dog\ndog2,dog\ncat1,cat\nbroken,dog\n")
    out = root / "manifest"
    build_from_folders(src, src / "classes.csv", out, BuildConfig(min_side=32))
    rec = Manifest.open(out).record("broken")
    shard = out / rec.shards[0]
    data = bytearray(shard.read_bytes())
    start = rec.shard_offsets[0] + 600
    data[start:start + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    return str(out)


# --------------------------------------------------------------------------- best-step scorers (plugins)

SCRIPT: dict[str, list[float]] = {"subject": [], "prompt": []}


class ScriptedScorer:
    """A best-step scorer whose scores come, one evaluation at a time, from ``SCRIPT``
    (``select_scorer="helpers:ScriptedScorer"``): each call takes the next value."""

    def __init__(self, **_):
        pass

    def subject(self, generated, real):
        return [SCRIPT["subject"].pop(0)] * len(generated)

    def prompt(self, generated, prompts):
        return [SCRIPT["prompt"].pop(0)] * len(generated)


class PixelScorer:
    """A deterministic best-step scorer from the pixels: subject is minus the mean distance to
    the photos' mean colour, prompt a constant (every step qualifies)."""

    def __init__(self, **_):
        pass

    def subject(self, generated, real):
        target = np.mean([np.asarray(im, dtype=np.float32).mean((0, 1)) for im in real], 0)
        return [-float(np.abs(np.asarray(im, dtype=np.float32).mean((0, 1)) - target).mean()) for im in generated]

    def prompt(self, generated, prompts):
        return [1.0] * len(generated)


LORA_FILE = "pytorch_lora_weights.safetensors"


def perturbed(src: Path, dest: Path, sid: str, seed: int) -> Path:
    """``src``'s expert under another id, its LoRA up-projections moved by a seeded amount."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dest)
    with safe_open(str(src / LORA_FILE), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    gen = torch.Generator().manual_seed(seed)
    for k, v in state.items():
        if ".up." in k or "lora_B" in k:
            state[k] = v + torch.randn(v.shape, generator=gen) * v.abs().mean().clamp(min=1e-3) * 4
    save_file(state, str(dest / LORA_FILE), metadata=meta)
    info = json.loads((dest / "expert.json").read_text())
    info.update(subject_id=sid)
    (dest / "expert.json").write_text(json.dumps(info))
    return dest


SHIPPED_MAX_BYTES = 20 * 2**20  # a shipped toy base model stays under 20 MB (issues 7 and 21)


def shipped_base_record(folder: Path) -> dict:
    """A base model folder shipped in the repository: at most 20 MB, weights only as
    safetensors, with its pretraining record (``pretrain.json``), which is returned."""
    from dreamfleet.core.artifacts import read_json

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= SHIPPED_MAX_BYTES
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    record = read_json(folder / "pretrain.json")
    assert record["unet_loss"][-1]["loss"] < record["unet_loss"][0]["loss"]
    return record
