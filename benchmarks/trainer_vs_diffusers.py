"""dreamfleet's DreamBooth trainer against a reference written from diffusers' DreamBooth scripts.

Both variants train the same subject (synthetic photos), with the same base model,
resolution, batch size, steps, prior preservation (instance + class batches, one UNet pass)
and hyperparameters. They differ only in how a step is done:

- ``dreamfleet``: ``prepare_subject`` + ``setup_trainable`` + ``DreamBoothObjective`` +
  ``run_loop``, unchanged (cached latents and text embeddings, foreach/fused AdamW).
- ``reference``: the step of ``examples/dreambooth/train_dreambooth.py`` (full) and
  ``train_dreambooth_lora.py`` (LoRA): VAE encoding and the text encoder every step,
  ``torch.optim.AdamW`` with its defaults, autocast around the UNet only (what
  ``accelerator.prepare`` does), fp32 trainable weights. See docs/benchmarks.md for the list.

Each run is a fresh subprocess (so peak memory is that variant's alone), in the order
A, B, A, B, ...; the report gives min/median/max and the ratio of medians.

    .venv/bin/python benchmarks/trainer_vs_diffusers.py --model tiny --methods lora full \\
        --steps 40 --warmup 5 --repeats 5
    .venv/bin/python benchmarks/trainer_vs_diffusers.py --model sd15 --resolution 512 \\
        --methods lora full --steps 30 --warmup 5 --repeats 3            # on a GPU
    .venv/bin/python benchmarks/trainer_vs_diffusers.py --mfu --model sd15 --batch-sizes 1 4 8  # GPU

``--model sd15`` builds a Stable-Diffusion-1.5-sized UNet, VAE and CLIP text encoder from
their published configs with random weights (speed does not depend on the weights; nothing
is downloaded) and the tiny tokenizer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VARIANTS = ("dreamfleet", "reference")
# Peak dense bf16 tensor-core rate (no sparsity), FLOP/s, from NVIDIA's data sheets (SXM parts).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


# --------------------------------------------------------------------------- models


def sd15_base(seed: int = 0):
    """A Stable-Diffusion-1.5-sized base model with random weights and the tiny tokenizer.

    The configs are those of runwayml/stable-diffusion-v1-5 (unet, vae, text_encoder); the
    model hash is a fixed name, not a hash of 1.1 B random parameters.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamfleet.core.models import BaseModel, tiny_configs
    from dreamfleet.core.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
    sched = tiny_configs(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)["scheduler"]
    scheduler = DDPMScheduler(**{k: v for k, v in sched.items() if k != "set_alpha_to_one"})
    return BaseModel(spec="sd15-random", unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                     tokenizer=tok, noise_scheduler=scheduler, model_hash=f"sd15-random-seed{seed}")


def build_base(model: str):
    from dreamfleet.core.models import load_base

    return sd15_base() if model == "sd15" else load_base({"tiny": "tiny-random"}.get(model, model))


# --------------------------------------------------------------------------- the shared subject


@dataclass
class Spec:
    """What both variants share; the worker subprocess gets it as JSON."""

    model: str = "tiny"
    method: str = "lora"
    resolution: int | None = None
    batch_size: int = 1
    steps: int = 40
    warmup: int = 5
    mixed_precision: str = "auto"
    prior: bool = True
    num_instance: int = 4
    num_class: int = 8
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    extra: dict = field(default_factory=dict)

    def train_config(self):
        from dreamfleet.trainers.config import TrainConfig

        return TrainConfig(
            method=self.method, steps=self.steps + self.warmup, resolution=self.resolution,
            batch_size=self.batch_size, with_prior_preservation=self.prior, num_class_images=self.num_class,
            mixed_precision=self.mixed_precision, seed=self.seed, device=self.device,
            checkpoint_every=0, validation_every=0,
        )


def class_image_cache(base, cfg, root: Path):
    """A class-image cache under ``root``, filled beforehand with synthetic 'dog' class photos when
    ``cfg`` uses prior preservation (generating them is a one-off shared cost, not a training step)."""
    from helpers import picture

    from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest

    cache = ClassImageCache(root / "class-images")
    if cfg.with_prior_preservation:
        req = ClassImageRequest.for_config(cfg, cfg.class_prompt.format(class_noun="dog"))
        folder = cache.folder_for(base, req)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.num_class_images):
            picture(10_000 + i, size=(cfg.resolution, cfg.resolution)).save(folder / f"{i:05d}.png")
    return cache


def synthetic_photos(first_seed: int, n: int, side: int):
    """``n`` synthetic instance photos, slightly wider than ``side`` (the trainer crops them)."""
    from helpers import picture

    return [picture(first_seed + j, size=(side + side // 4, side)) for j in range(n)]


def prepared_subject(spec: Spec, root: Path):
    """``prepare_subject`` on synthetic photos, with the class-image cache filled beforehand."""
    from dreamfleet.trainers.dreambooth import SubjectData, prepare_subject

    base = build_base(spec.model)
    cfg = spec.train_config().resolve(native_resolution=base.resolution)
    cache = class_image_cache(base, cfg, root)
    subject = SubjectData("bench_dog", "dog", synthetic_photos(0, spec.num_instance, cfg.resolution))
    return prepare_subject(subject, base, cfg, class_cache=cache)


# --------------------------------------------------------------------------- the two variants


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_dreamfleet(p, spec: Spec) -> dict:
    """dreamfleet's trainer, exactly as ``train_subject`` runs it (minus validation and publishing)."""
    from dreamfleet.trainers.dreambooth import DreamBoothObjective, loop_settings, setup_trainable
    from dreamfleet.trainers.loop import LoopHooks, run_loop

    t0 = time.perf_counter()
    setup_trainable(p)
    objective = DreamBoothObjective.from_prepared(p)
    sync(p.device)
    setup_s = time.perf_counter() - t0
    stamps: list[float] = []

    def on_step(step: int, metrics: dict) -> None:
        sync(p.device)
        stamps.append(time.perf_counter())

    t_loop = time.perf_counter()
    result = run_loop(objective, loop_settings(p, progress=False), hooks=LoopHooks(on_step=on_step))
    return {"setup_s": setup_s, "t_loop": t_loop, "stamps": stamps, "losses": [h["loss"] for h in result.history]}


class ReferenceDreamBooth:
    """The training step of diffusers' train_dreambooth.py / train_dreambooth_lora.py.

    Data loading is given for free (pixels already transformed, prompts already tokenised),
    which favours the reference: the script's DataLoader transforms and tokenises every step.
    """

    TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
    VAE_DTYPE: torch.dtype | None = None  # the scripts' VAE dtype where it is not weight_dtype

    def __init__(self, p):
        from peft import LoraConfig

        cfg, base = p.cfg, p.base
        self.p, self.cfg, self.device = p, cfg, p.device
        self.unet, self.vae, self.text_encoder = base.denoiser, base.vae, base.text_encoder
        self.text_encoders = list(base.text_encoders.values())
        self.noise_scheduler = base.noise_scheduler
        self.mixed = p.autocast_dtype  # accelerator.mixed_precision
        self.weight_dtype = p.weight_dtype
        self.vae.requires_grad_(False)
        for encoder in self.text_encoders:
            encoder.requires_grad_(False)
        if cfg.method == "lora":
            # train_dreambooth_lora.py: frozen UNet in weight_dtype, adapter on the attention projections.
            self.unet.requires_grad_(False)
            self.unet.to(self.device, dtype=self.weight_dtype)
            self.unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                             target_modules=list(self.TARGETS)))
            for param in self.unet.parameters():  # cast_training_params(unet, dtype=torch.float32)
                if param.requires_grad:
                    param.data = param.data.float()
            self.params = [q for q in self.unet.parameters() if q.requires_grad]
        else:
            # train_dreambooth.py: the UNet must be loaded in float32 and is trained in it.
            self.unet.requires_grad_(True)
            self.unet.to(self.device, dtype=torch.float32)
            self.params = list(self.unet.parameters())
        self.vae.to(self.device, dtype=self.VAE_DTYPE or self.weight_dtype)
        for encoder in self.text_encoders:
            encoder.to(self.device, dtype=self.weight_dtype)
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.mixed == torch.float16 else None
        tok = base.tokenizer

        def ids(prompt: str) -> torch.Tensor:  # tokenize_prompt(): padding="max_length", truncation
            return tok(prompt, truncation=True, padding="max_length", max_length=tok.model_max_length,
                       return_tensors="pt").input_ids
        self.instance_ids, self.class_ids = ids(p.instance_prompt), ids(p.class_prompt)
        self.prior = cfg.with_prior_preservation and p.klass is not None
        self.unet.train()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """collate_fn(examples, with_prior_preservation): instance then class, one tensor each."""
        p, bs = self.p, self.cfg.batch_size
        idx = torch.randint(len(p.instance), (bs,))
        pixels, ids = [p.instance.bchw[idx]], [self.instance_ids] * bs
        if self.prior:
            pixels.append(p.klass.bchw[torch.randint(len(p.klass), (bs,))])
            ids += [self.class_ids] * bs
        return torch.cat(pixels), torch.cat(ids)

    def step(self) -> float:
        loss = self.loss()
        self.update(loss)
        return loss.detach().item()  # logs = {"loss": loss.detach().item(), ...} every step

    def loss(self) -> torch.Tensor:
        pixels, input_ids = self.batch()
        pixel_values = pixels.to(self.device, dtype=self.weight_dtype)
        model_input = self.vae.encode(pixel_values).latent_dist.sample()
        model_input = model_input * self.vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        bsz = model_input.shape[0]
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=model_input.device)
        noisy_model_input = self.noise_scheduler.add_noise(model_input, noise, timesteps.long())
        encoder_hidden_states = self.text_encoder(input_ids.to(self.device))[0]  # encode_prompt(), no attention mask
        # accelerator.prepare(unet) wraps its forward in autocast and converts its outputs to fp32.
        with torch.autocast(self.device.type, dtype=self.mixed or torch.float32, enabled=self.mixed is not None):
            model_pred = self.unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        model_pred = model_pred.float()
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(model_input, noise, timesteps)
        else:
            target = noise
        if self.prior:
            model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        if self.prior:
            loss = loss + self.cfg.prior_loss_weight * prior_loss
        return loss

    def update(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # accelerator.backward
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)  # accelerator.clip_grad_norm_
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)  # --set_grads_to_none is off by default


def run_reference(p, spec: Spec) -> dict:
    torch.manual_seed(spec.seed)  # set_seed(args.seed)
    t0 = time.perf_counter()
    from reference_families import REFERENCES

    ref = REFERENCES.get(p.base.family, ReferenceDreamBooth)(p)
    sync(p.device)
    setup_s = time.perf_counter() - t0
    stamps, losses = [], []
    t_loop = time.perf_counter()
    for _ in range(p.cfg.steps):
        losses.append(ref.step())
        sync(p.device)
        stamps.append(time.perf_counter())
    return {"setup_s": setup_s, "t_loop": t_loop, "stamps": stamps, "losses": losses}


# --------------------------------------------------------------------------- one variant, one process


class RssSampler:
    """Peak resident set size of this process, sampled every few ms (torch allocates outside
    Python's allocator, so tracemalloc sees none of it)."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self.proc, self.interval_s, self.peak = psutil.Process(), interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.baseline = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def run_variant(variant: str, spec: Spec) -> dict:
    """Train one variant in this process and measure it."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    root = Path(tempfile.mkdtemp(prefix="dreamfleet-tvd-"))
    p = prepared_subject(spec, root)
    if p.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(p.device)
    fn = run_dreamfleet if variant == "dreamfleet" else run_reference
    with RssSampler() as rss:
        out = fn(p, spec)
    stamps, w = out["stamps"], spec.warmup
    timed = stamps[-1] - (stamps[w - 1] if w else out["t_loop"])
    row = {
        "variant": variant,
        "steps_per_s": spec.steps / timed,
        "step_ms": 1000 * timed / spec.steps,
        "setup_s": out["setup_s"],
        "end_to_end_s": out["setup_s"] + stamps[-1] - out["t_loop"],
        "rss_peak_mb": rss.peak / 2**20,
        "rss_delta_mb": (rss.peak - rss.baseline) / 2**20,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "losses": out["losses"],
        "device": str(p.device),
        "threads": torch.get_num_threads(),
    }
    if p.device.type == "cuda":
        row["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(p.device) / 2**20
    return row


def run_in_subprocess(variant: str, spec: Spec) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--spec", json.dumps(asdict(spec))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- FLOPs and MFU


def flops_per_step(spec: Spec) -> dict:
    """FLOPs of one dreamfleet training step (forward + backward; the optimizer is elementwise
    and not counted), with FlopCounterMode, then the step time and MFU over ``spec.steps`` steps."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamfleet.trainers.dreambooth import DreamBoothObjective, loop_settings, setup_trainable
    from dreamfleet.trainers.loop import LocalEngine, autocast

    if spec.threads:
        torch.set_num_threads(spec.threads)
    p = prepared_subject(spec, Path(tempfile.mkdtemp(prefix="dreamfleet-mfu-")))
    setup_trainable(p)
    objective = DreamBoothObjective.from_prepared(p)
    s = loop_settings(p, progress=False)
    engine = LocalEngine(objective, s)

    def step(i: int) -> None:
        with autocast(p.device, p.autocast_dtype):
            loss, _ = objective.loss(i, 0)
        engine.backward(loss)
        engine.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step(0)
    flops = counter.get_total_flops()
    for i in range(1, 1 + spec.warmup):
        step(i)
    sync(p.device)
    t0 = time.perf_counter()
    for i in range(spec.steps):
        step(1 + spec.warmup + i)
    sync(p.device)
    step_s = (time.perf_counter() - t0) / spec.steps
    row = {"batch_size": spec.batch_size, "images_per_step": spec.batch_size * (2 if spec.prior else 1),
           "flops_per_step": flops, "step_s": step_s, "achieved_flop_s": flops / step_s, "device": str(p.device)}
    if p.device.type == "cuda":
        name = torch.cuda.get_device_name(p.device)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        row.update(gpu=name, peak_bf16_flop_s=peak, mfu=flops / step_s / peak if peak else None,
                   cuda_peak_allocated_mb=torch.cuda.max_memory_allocated(p.device) / 2**20)
    return row


# --------------------------------------------------------------------------- the driver


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": values}


def compare(spec: Spec, repeats: int, log=print) -> dict:
    """A, B, A, B, ... in fresh subprocesses; the ratio is of the medians."""
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r, variant in itertools.product(range(repeats), VARIANTS):
        row = run_in_subprocess(variant, spec)
        runs[variant].append(row)
        log(f"  {spec.method:4s} run {r + 1}/{repeats} {variant:10s} {row['steps_per_s']:8.2f} steps/s  "
            f"{row['step_ms']:8.1f} ms/step  rss peak {row['rss_peak_mb']:7.0f} MiB")
    out = {"spec": asdict(spec)}
    for variant, rows in runs.items():
        keys = ["steps_per_s", "step_ms", "setup_s", "end_to_end_s", "rss_peak_mb", "rss_delta_mb", "maxrss_mb"]
        keys += ["cuda_peak_allocated_mb"] if "cuda_peak_allocated_mb" in rows[0] else []
        out[variant] = {k: summary([row[k] for row in rows]) for k in keys}
        out[variant]["losses_first_run"] = rows[0]["losses"]
        out[variant]["device"], out[variant]["threads"] = rows[0]["device"], rows[0]["threads"]
    d, ref = out["dreamfleet"], out["reference"]
    out["speedup"] = d["steps_per_s"]["median"] / ref["steps_per_s"]["median"]
    # Each A,B pair ran back to back, so its ratio cancels slow drifts in machine load.
    pairs = [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["dreamfleet"], runs["reference"], strict=True)]
    out["paired_speedup"] = summary(pairs)
    out["end_to_end_speedup"] = ref["end_to_end_s"]["median"] / d["end_to_end_s"]["median"]
    mem = "cuda_peak_allocated_mb" if "cuda_peak_allocated_mb" in d else "rss_peak_mb"
    out["memory_ratio"] = {"metric": mem, "dreamfleet_over_reference": d[mem]["median"] / ref[mem]["median"]}
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "machine": platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny (tiny-random), toy, sd15 (SD-1.5-sized, random weights)")
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--resolution", type=int, default=None, help="default: the model's native resolution")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="with --mfu")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--repeats", type=int, default=5, help="A,B pairs")
    ap.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    ap.add_argument("--no-prior", action="store_true", help="without prior preservation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--mfu", action="store_true", help="FLOPs per step and MFU instead of the A/B comparison")
    ap.add_argument("--out", default=None, help="JSON result (default: benchmarks/results/<name>.json)")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        row = run_variant(args.worker, Spec(**json.loads(args.spec)))
        print(json.dumps(row))
        return row
    base_spec = Spec(model=args.model, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
                     warmup=args.warmup, mixed_precision=args.mixed_precision, prior=not args.no_prior,
                     device=args.device, threads=args.threads)
    result: dict = {"date": dt.date.today().isoformat(), "machine": machine(), "command": " ".join(sys.argv)}
    if args.mfu:
        result["mfu"] = {}
        for method in args.methods:
            rows = []
            for bs in args.batch_sizes:
                spec = Spec(**{**asdict(base_spec), "method": method, "batch_size": bs})
                row = json.loads(subprocess.run(
                    [sys.executable, "-c", f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                     f"import trainer_vs_diffusers as t; print(json.dumps(t.flops_per_step(t.Spec(**{asdict(spec)!r}))))"],
                    capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
                mfu = f"MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "MFU n/a (no GPU)"
                print(f"{method:4s} batch {bs}: {row['flops_per_step'] / 1e9:10.2f} GFLOP/step  "
                      f"{row['step_s'] * 1000:8.1f} ms/step  {row['achieved_flop_s'] / 1e9:8.2f} GFLOP/s  {mfu}")
                rows.append(row)
            result["mfu"][method] = rows
        name = f"mfu_{args.model}"
    else:
        result["comparisons"] = {}
        for method in args.methods:
            spec = Spec(**{**asdict(base_spec), "method": method})
            print(f"{args.model} {method}: {args.repeats} x (dreamfleet, reference), {args.steps} timed steps each")
            cmp = compare(spec, args.repeats)
            d, ref = cmp["dreamfleet"], cmp["reference"]
            print(f"  median steps/s: dreamfleet {d['steps_per_s']['median']:.2f}, reference "
                  f"{ref['steps_per_s']['median']:.2f}, ratio {cmp['speedup']:.2f}x (paired: median "
                  f"{cmp['paired_speedup']['median']:.2f}x, min {cmp['paired_speedup']['min']:.2f}x); memory "
                  f"{cmp['memory_ratio']['metric']} dreamfleet/reference {cmp['memory_ratio']['dreamfleet_over_reference']:.2f}")
            result["comparisons"][method] = cmp
        name = f"trainer_vs_diffusers_{args.model}"
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
