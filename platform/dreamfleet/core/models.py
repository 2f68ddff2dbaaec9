"""Base models: one loader, :func:`load_base`, for every kind of base model.

A spec is one of:

- ``tiny-random``: a ~2M-parameter Stable-Diffusion-shaped model built from configs in
  code with a fixed seed, and a locally learned tokenizer (for tests; it generates noise);
- a local diffusers folder (a Stable Diffusion 1.x/2.x or SDXL checkout on disk);
- a Hugging Face hub id (``org/name``), fetched only when the hub is reachable and
  ``HF_HUB_OFFLINE`` is not set; otherwise only the local cache is used.

Every base model comes with a content hash of its weights, recorded in every artifact
built from it and used as the key of the class-image cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamfleet.core.errors import ModelError
from dreamfleet.core.families import Family, detect, get_family
from dreamfleet.core.hashing import sha256_file

log = logging.getLogger("dreamfleet")

SD_FAMILY = "sd"
# What a saved base model says about itself beyond diffusers' configs (BaseModel.extra: its
# native resolution, whether it samples with true classifier-free guidance), in model_index.json.
EXTRA_KEY = "_dreamfleet"


@dataclass
class BaseModel:
    """The diffusers components of a base model, plus what identifies it.

    Which components are set depends on the family (:mod:`dreamfleet.core.families`): a UNet
    or a transformer as the denoiser, one to three text encoders and their tokenizers.
    """

    spec: str
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    model_hash: str
    unet: Any = None
    family: str = SD_FAMILY
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    transformer: Any = None
    text_encoder_3: Any = None
    tokenizer_3: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> Family:
        """The family's behaviour (how it encodes prompts, what it is trained on, ...)."""
        return get_family(self.family)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or the transformer: the module DreamBooth fine-tunes."""
        return getattr(self, self.kind.denoiser)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self, name) for name in self.kind.text_encoders}

    def modules(self) -> dict[str, torch.nn.Module]:
        """Every weight-holding component, by its pipeline name."""
        return {self.kind.denoiser: self.denoiser, "vae": self.vae, **self.text_encoders}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The native image side in pixels."""
        return self.kind.native_resolution(self)

    @property
    def describe(self) -> dict[str, Any]:
        return {"spec": self.spec, "hash": self.model_hash, "family": self.family, "resolution": self.resolution}

    def inference_scheduler(self):
        return self.kind.inference_scheduler(self)

    def pipeline(self, *, device: str | torch.device | None = None, **replace: Any):
        """The family's stock diffusers pipeline over these components, or over replacements
        given by component name (``unet=``, ``transformer=``, ``text_encoder=``, ...)."""
        pipe = self.kind.pipeline(self, **replace)
        pipe.native_resolution = self.resolution
        if device is not None:
            pipe.to(device)
        return pipe

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a standard diffusers folder (loadable by ``load_base(folder)`` and by diffusers itself)."""
        folder = Path(folder)
        pipe = self.pipeline()
        pipe.scheduler = self.noise_scheduler
        pipe.save_pretrained(folder, safe_serialization=True)
        if self.extra:  # diffusers ignores "_" keys of model_index.json; load_folder reads this one back
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps({**index, EXTRA_KEY: self.extra}, indent=2) + "\n")
        return folder


# --------------------------------------------------------------------------- tiny-random

TINY_SEED = 0


def tiny_configs(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict[str, dict]:
    """Configs of the tiny model: SD-shaped, UNet channels (32, 64), 32 px images, 16x16 latents."""
    return {
        "unet": dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        "text_encoder": dict(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        ),
        "scheduler": dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
    }


def state_dict_hash(*modules: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def build_tiny_random() -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamfleet.core.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    cfgs = tiny_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Fork the RNG so building the model never perturbs the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    scheduler = DDPMScheduler(**{k: v for k, v in cfgs["scheduler"].items() if k != "set_alpha_to_one"})
    # Make every default explicit, as a saved scheduler_config.json is: otherwise diffusers'
    # from_config gives the inference scheduler its own defaults (e.g. timestep_spacing) in
    # memory but the saved values on disk, and a saved copy would sample differently.
    scheduler = DDPMScheduler.from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})
    return BaseModel(
        spec="tiny-random",
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        noise_scheduler=scheduler,
        model_hash=state_dict_hash(unet, vae, text_encoder),
    )


# Named models of core itself; packages register theirs (the toy world's "toy") as entry
# points in the "dreamfleet.models" group, so that core never imports them.
def _tiny(name: str) -> Callable[[], BaseModel]:
    def build() -> BaseModel:
        from dreamfleet.core import tiny

        return getattr(tiny, f"build_tiny_{name}")()

    return build


BUILTIN_MODELS: dict[str, Callable[[], BaseModel]] = {
    "tiny-random": build_tiny_random, "tiny-sdxl": _tiny("sdxl"), "tiny-sd3": _tiny("sd3"),
    "tiny-flux": _tiny("flux"), "tiny-zimage": _tiny("zimage"),
}
MODEL_ENTRY_POINTS = "dreamfleet.models"


def named_models() -> dict[str, Callable[[], BaseModel]]:
    """Every named base model: core's own and those registered as entry points."""
    from importlib.metadata import entry_points

    found = {ep.name: ep.load for ep in entry_points(group=MODEL_ENTRY_POINTS)}
    return {**{name: (lambda load=load: load()()) for name, load in found.items()}, **BUILTIN_MODELS}


# --------------------------------------------------------------------------- folders and hub


def _hash_cache_path() -> Path:
    root = Path(os.environ.get("DREAMFLEET_CACHE", Path.home() / ".cache" / "dreamfleet"))
    return root / "file-hashes.json"


def cached_file_hash(path: Path) -> str:
    """sha256 of a (possibly multi-GB) weight file, memoised by path, size and mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _hash_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_path)
        except OSError:
            pass
    return cache[key]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt")
CONFIG_NAMES = ("config.json", "scheduler_config.json", "model_index.json", "vocab.json", "merges.txt")


def folder_hash(folder: Path) -> str:
    """Hash of a diffusers folder: its configs, tokenizer files and weights (one variant per component)."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        rel = path.relative_to(folder).as_posix()
        if path.name in CONFIG_NAMES:
            h.update(f"{rel}:{sha256_file(path)}\n".encode())
        elif path.suffix in WEIGHT_SUFFIXES:
            h.update(f"{rel}:{cached_file_hash(path)}\n".encode())
    return h.hexdigest()


def load_folder(folder: Path, spec: str, dtype: torch.dtype | None = None) -> BaseModel:
    """A diffusers folder of any family (detected from its ``model_index.json``)."""
    family = detect(folder)
    components = family.load(folder, dtype)
    extra = json.loads((folder / "model_index.json").read_text()).get(EXTRA_KEY, {})
    return BaseModel(spec=spec, model_hash=folder_hash(folder), family=family.name, extra=dict(extra), **components)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            local_files_only=offline,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
            ignore_patterns=["*.fp16.*", "*non_ema*", "*.ckpt", "*.bin"],
        )
    except Exception as e:  # hub errors come in many types: offline, 401, 404, network
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        raise ModelError(
            f"base model {repo_id!r} is not a local folder and could not be found {where} ({type(e).__name__}); "
            "download it on a machine with internet (`huggingface-cli download "
            f"{repo_id}`) and pass the local folder, or use 'tiny-random'"
        ) from None
    return Path(path)


@functools.lru_cache(maxsize=4)
def _load_cached(spec: str) -> BaseModel:
    return _load(spec)


def _load(spec: str, dtype: torch.dtype | None = None) -> BaseModel:
    named = named_models()
    if spec in named:
        return named[spec]()
    path = Path(spec).expanduser()
    if path.exists():
        return load_folder(path, spec=str(path.resolve()), dtype=dtype)
    repo, _, revision = spec.partition("@")
    if repo.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return load_folder(resolve_hub(repo, revision or None), spec=spec, dtype=dtype)
    raise ModelError(
        f"base model {spec!r} not found: it is not a named model ({', '.join(named)}), "
        "not an existing folder, and not a hub id of the form org/name"
    )


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
    """Only the tokenizer of a base model (what a router needs to check prompt lengths)."""
    if spec == "tiny-random":
        from dreamfleet.core.tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer()
    path = Path(spec).expanduser()
    named = {} if path.exists() else named_models()
    if spec in named:
        return named[spec]().tokenizer
    if not path.exists() and spec.count("/") == 1:
        repo, _, revision = spec.partition("@")
        path = resolve_hub(repo, revision or None)
    from transformers import AutoTokenizer  # CLIP for the SD/SDXL/SD3/Flux families, Qwen for Z-Image

    try:
        return AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise ModelError(f"{spec}: cannot load its tokenizer ({e})") from None


def load_base(spec: str, *, dtype: torch.dtype | None = None, fresh: bool = True) -> BaseModel:
    """Load the diffusers components of a base model.

    ``fresh=False`` returns a process-wide cached instance (the caller must not modify its
    weights); the default gives a new instance that a trainer may fine-tune in place.
    """
    if not spec or not isinstance(spec, str):
        raise ModelError("base model spec is empty; pass 'tiny-random', a local diffusers folder or a hub id")
    # One load at a time per process: diffusers' lazy imports are not thread-safe (two fan-outs
    # in one driver's threads failed with "cannot import name 'AutoencoderKL'"), and the cache
    # should load a model once, not once per racing thread.
    with _LOAD_LOCK:
        if fresh or dtype is not None:
            return _load(spec, dtype)
        return _load_cached(spec)


_LOAD_LOCK = threading.RLock()
