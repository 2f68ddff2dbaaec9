"""The apprentice (SuTI-style): a base model that personalises from demonstrations, no fine-tuning.

Design (see ``docs/apprentice.md``): decoupled cross-attention, as in SuTI's apprentice and
IP-Adapter, built from diffusers' own IP-Adapter machinery so the result is a plain
``StableDiffusionPipeline`` called with ``ip_adapter_image_embeds``:

- the demonstrations (1-8 photos of the subject) are encoded by the base model's frozen VAE
  (latent means, deterministic), then a small trainable convolutional :class:`DemoEncoder`
  turns each demonstration's latent into ``grid x grid`` tokens of the text encoder's width;
  the tokens of all demonstrations are concatenated (any number of demonstrations);
- every cross-attention layer of the UNet gets a second key/value projection for those
  tokens (``IPAdapterAttnProcessor2_0``): ``out = attn(q, K_text, V_text) + attn(q, K_demo, V_demo)``;
- the demonstration value projections start at zero, so a fresh apprentice generates
  exactly what the base model generates (tested); the key projections start as copies of
  the text key projections.

Unconditional guidance uses an empty prompt and all-zero demonstration latents, the
"no demonstration" input the apprentice is trained with (demonstrations are dropped for a
fraction of the training samples).

This module is Ray-free and trainer-free: serving and the CLI load an apprentice from its
folder (``apprentice.json`` + ``apprentice.safetensors``); the trainer lives in
:mod:`dreamfleet.trainers.apprentice`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from dreamfleet.core.artifacts import read_record
from dreamfleet.core.errors import ConfigError, DataError

APPRENTICE_FILE = "apprentice.json"
APPRENTICE_WEIGHTS = "apprentice.safetensors"
APPRENTICE_SCHEMA_VERSION = 1
MIN_DEMOS = 1
MAX_DEMOS = 8
# Placeholder for the subject in apprentice prompts; replaced by the apprentice's identifier.
SUBJECT_TOKEN = "[V]"


@dataclass
class ApprenticeArch:
    """The shape of the added modules (recorded in apprentice.json)."""

    grid: int = 4
    """tokens per demonstration = grid x grid"""
    width: int = 64
    """channels of the demonstration encoder's convolutions"""
    scale: float = 1.0
    """weight of the demonstration attention (the IP-Adapter scale)"""


class DemoEncoder(nn.Module):
    """VAE latent of one demonstration -> ``grid*grid`` conditioning tokens.

    Takes flattened latents ``[N, C*h*w]`` (the pipeline passes image embeddings as 3-D
    tensors ``[batch, demos, features]``) and returns ``[N, grid*grid, dim]``.
    """

    def __init__(self, latent_channels: int, latent_size: int, dim: int, arch: ApprenticeArch):
        super().__init__()
        if latent_size < arch.grid or latent_size % arch.grid:
            raise ConfigError(f"apprentice grid {arch.grid} must divide the latent side {latent_size}")
        self.c, self.s, self.grid = latent_channels, latent_size, arch.grid
        downs = round(math.log2(latent_size // arch.grid))
        if 2 ** downs * arch.grid != latent_size:
            raise ConfigError(f"latent side {latent_size} / grid {arch.grid} must be a power of two")
        layers: list[nn.Module] = [nn.Conv2d(latent_channels, arch.width, 3, padding=1), nn.SiLU()]
        for _ in range(downs):
            layers += [nn.Conv2d(arch.width, arch.width, 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(arch.width, dim, 1)]
        self.net = nn.Sequential(*layers)
        self.pos = nn.Parameter(torch.zeros(1, arch.grid * arch.grid, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        x = flat.reshape(-1, self.c, self.s, self.s)
        tokens = self.net(x).flatten(2).transpose(1, 2)
        return self.norm(tokens + self.pos)


def attach(unet, arch: ApprenticeArch, *, latent_channels: int, latent_size: int) -> nn.ModuleDict:
    """Add the demonstration encoder and the decoupled cross-attention to ``unet`` (in place).

    Returns the added modules (``{"image_proj": ..., "ip_layers": ...}``); the UNet's own
    weights are untouched. Use a fresh UNet (``load_base(spec)``), never a shared one.
    """
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import MultiIPAdapterImageProjection

    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ConfigError("this UNet already has an image projection (an apprentice or IP-Adapter is attached)")
    dim = int(unet.config.cross_attention_dim)
    procs, added = {}, nn.ModuleDict()
    for name, proc in unet.attn_processors.items():
        if not name.endswith("attn2.processor"):
            procs[name] = proc
            continue
        attn = unet.get_submodule(name[: -len(".processor")])
        ip = IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, num_tokens=(arch.grid**2,),
                                       scale=arch.scale)
        with torch.no_grad():
            ip.to_k_ip[0].weight.copy_(attn.to_k.weight)
            ip.to_v_ip[0].weight.zero_()  # the apprentice starts exactly as the base model
        ip.to(attn.to_k.weight.device, attn.to_k.weight.dtype)
        procs[name] = ip
        added[name.replace(".", "__")] = ip
    if not added:
        raise ConfigError("the UNet has no cross-attention layers to attach the apprentice to")
    unet.set_attn_processor(procs)
    encoder = DemoEncoder(latent_channels, latent_size, dim, arch)
    ref = next(unet.parameters())
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([encoder.to(ref.device, ref.dtype)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return nn.ModuleDict({"image_proj": unet.encoder_hid_proj, "ip_layers": added})


def is_apprentice_key(key: str) -> bool:
    """UNet state-dict keys of the apprentice's own weights (also in a ZeRO-3 consolidated dict)."""
    return key.startswith("encoder_hid_proj.") or ".processor." in key


def apprentice_state(unet, full_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    state = full_state if full_state is not None else unet.state_dict()
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items() if is_apprentice_key(k)}


def load_apprentice_state(unet, state: dict[str, torch.Tensor], *, where: str) -> None:
    own = {k: v for k, v in unet.state_dict().items() if is_apprentice_key(k)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise DataError(f"{where}: apprentice weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); was it trained on another base model?")
    unet.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- the artifact


@dataclass
class ApprenticeInfo:
    identifier: str
    base_model: dict[str, Any]
    arch: dict[str, Any]
    config: dict[str, Any]
    code_version: dict[str, Any]
    input_hash: str
    """content hash of the demonstration set it was trained on"""
    dataset: dict[str, Any]
    final_loss: float | None
    wall_time_s: float
    created_at: str
    weights: list[str] = field(default_factory=lambda: [APPRENTICE_WEIGHTS])
    train_stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = APPRENTICE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> ApprenticeInfo:
        return read_record(cls, Path(folder) / APPRENTICE_FILE, APPRENTICE_SCHEMA_VERSION,
                           missing=f"{folder}: not an apprentice folder (no {APPRENTICE_FILE}); train one with "
                                   "`dreamfleet apprentice train`",
                           newer="{path}: written by a newer dreamfleet; upgrade dreamfleet")


def fill_prompt(prompt: str, identifier: str, class_noun: str | None = None) -> str:
    """``[V]``/``{identifier}`` -> the apprentice's identifier; ``{subject}`` -> "[V] class"."""
    subject = f"{identifier} {class_noun}" if class_noun else identifier
    return prompt.replace("{subject}", subject).replace(SUBJECT_TOKEN, identifier).replace("{identifier}", identifier)


def check_demonstrations(images: list[Image.Image], *, where: str = "demonstrations") -> None:
    if not MIN_DEMOS <= len(images) <= MAX_DEMOS:
        raise DataError(f"{where}: {len(images)} image(s); give {MIN_DEMOS}-{MAX_DEMOS} photos of the subject "
                        "(3-5 work best)")


def pixels(img: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side, center-crop a square, scale to [-1, 1]: (3, R, R)."""
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)


@torch.no_grad()
def encode_demos(vae, images: list[Image.Image], resolution: int) -> torch.Tensor:
    """Flattened scaled VAE latent means of the demonstrations: ``[K, C*h*w]`` (float32, CPU)."""
    ref = next(vae.parameters())
    x = torch.stack([pixels(im, resolution) for im in images]).to(ref.device, ref.dtype)
    mean = vae.encode(x).latent_dist.mean * float(vae.config.scaling_factor)
    return mean.float().flatten(1).cpu()


class Apprentice:
    """A loaded apprentice: a fresh base model with the apprentice attached, ready to generate."""

    def __init__(self, base, info: ApprenticeInfo, arch: ApprenticeArch):
        self.base, self.info, self.arch = base, info, arch

    @classmethod
    def fresh(cls, base, arch: ApprenticeArch | None = None, *, identifier: str = "sks") -> Apprentice:
        """An untrained apprentice on ``base`` (a fresh BaseModel): generates what the base does."""
        arch = arch or ApprenticeArch()
        attach(base.unet, arch, latent_channels=int(base.unet.config.in_channels),
               latent_size=int(base.unet.config.sample_size))
        info = ApprenticeInfo(identifier=identifier, base_model=base.describe, arch=dataclasses.asdict(arch), config={},
                              code_version={}, input_hash="", dataset={}, final_loss=None, wall_time_s=0.0, created_at="")
        return cls(base, info, arch)

    @classmethod
    def load(cls, folder: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Apprentice:
        from safetensors.torch import load_file

        from dreamfleet.core.models import load_base

        folder = Path(folder)
        info = ApprenticeInfo.read(folder)
        base = load_base(info.base_model["spec"])  # fresh: the apprentice modifies its UNet
        if base.model_hash != info.base_model.get("hash"):
            raise DataError(f"{folder}: trained on base model {info.base_model.get('spec')!r} with hash "
                            f"{str(info.base_model.get('hash'))[:12]}, but that spec now loads hash {base.model_hash[:12]}")
        arch = ApprenticeArch(**info.arch)
        app = cls(base, info, arch)
        attach(base.unet, arch, latent_channels=int(base.unet.config.in_channels),
               latent_size=int(base.unet.config.sample_size))
        if (folder / "unet").is_dir():  # an apprentice whose UNet was fine-tuned too
            from diffusers import UNet2DConditionModel

            tuned = UNet2DConditionModel.from_pretrained(folder / "unet")
            base.unet.load_state_dict(tuned.state_dict(), strict=False)
        load_apprentice_state(base.unet, load_file(str(folder / APPRENTICE_WEIGHTS)), where=str(folder))
        for m in (base.unet, base.vae, base.text_encoder):
            m.to(device).eval().requires_grad_(False)
            if dtype is not None:
                m.to(dtype)
        return app

    @property
    def identifier(self) -> str:
        return self.info.identifier

    @property
    def device(self) -> torch.device:
        return next(self.base.unet.parameters()).device

    def encode(self, demos: list[Image.Image]) -> torch.Tensor:
        check_demonstrations(demos)
        return encode_demos(self.base.vae, demos, self.base.resolution)

    def pipeline(self):
        return self.base.pipeline()

    @torch.no_grad()
    def generate(self, demos: list[Image.Image] | torch.Tensor, prompts: list[str], *, steps: int = 25,
                 guidance_scale: float = 4.0, generators: list[torch.Generator] | None = None,
                 width: int | None = None, height: int | None = None, pipe=None) -> list[Image.Image]:
        """One image per prompt (prompts already filled), conditioned on the same demonstrations."""
        latents = demos if isinstance(demos, torch.Tensor) else self.encode(demos)
        ref = next(self.base.unet.parameters())
        pos = latents.to(ref.device, ref.dtype).unsqueeze(0).expand(len(prompts), -1, -1)
        embeds = torch.cat([torch.zeros_like(pos), pos]) if guidance_scale > 1.0 else pos
        pipe = pipe or self.pipeline()
        size = self.base.resolution
        return pipe(prompts, ip_adapter_image_embeds=[embeds], num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=generators, width=width or size,
                    height=height or size).images

    def bind(self, demos: list[Image.Image]) -> BoundApprentice:
        """A pipeline-like callable with the demonstrations fixed (what `dreamfleet eval` calls)."""
        return BoundApprentice(self, self.encode(demos))


class BoundApprentice:
    """Quacks like a ``StableDiffusionPipeline`` for evaluation code: ``pipe(prompts, ...).images``."""

    def __init__(self, apprentice: Apprentice, latents: torch.Tensor):
        self.apprentice, self.latents = apprentice, latents
        self._pipe = apprentice.pipeline()
        self.unet, self.vae_scale_factor = self._pipe.unet, self._pipe.vae_scale_factor

    def __call__(self, prompts, *, num_inference_steps: int = 25, guidance_scale: float = 4.0, generator=None,
                 height: int | None = None, width: int | None = None, **_: Any):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ident = self.apprentice.identifier
        images = self.apprentice.generate(self.latents, [fill_prompt(p, ident) for p in prompts],
                                          steps=num_inference_steps, guidance_scale=guidance_scale,
                                          generators=generator, width=width, height=height, pipe=self._pipe)
        return _Images(images)


@dataclass
class _Images:
    images: list[Image.Image]
