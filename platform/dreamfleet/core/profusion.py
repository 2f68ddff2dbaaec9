"""ProFusion's encoder (Zhou et al., 2023): PromptNet, its image encoders, and S* injection.

PromptNet turns one reference photo into S*, word embedding(s) that stand for the subject in
a prompt (``../shared/PROFUSION.md`` has the method at implementation level):

- its backbone is the encoder half of the base model's own UNet (``conv_in``, the time
  embedding, the down blocks, the cross-attention mid block), initialised from its weights;
- its inputs are the reference's clean latent x̄0 (into ``conv_in``), the noisy latent x_t
  being denoised (conv3x3 -> SiLU -> conv3x3, added to ``conv_in(x̄0)``), the timestep t,
  and the reference's image-encoder tokens (a Linear to the cross-attention width, used as the
  blocks' ``encoder_hidden_states``);
- its output is built from six feature maps (after ``conv_in``, after each down block, after
  the mid block), each taken by a strided conv to ``feature_channels`` at H_latent/8,
  concatenated, then a ``Conv2d(kernel = stride = k)`` to the text encoder's width: N =
  (H_latent / (8k))² tokens. ``k`` defaults to H_latent/8 at the base's native latent size,
  that is one token.

S* is recomputed at every denoising step (it depends on x_t and t). It enters the text
encoder as the *input* hidden state at the placeholder's positions, the output of
``text_model.embeddings`` (token plus position embedding), through a forward hook
(:class:`Injector`).

Image encoders: a CLIP vision model (a local folder or hub id, frozen: real SD models), or
``"vae"``, the base model's own frozen VAE encoder, whose latent positions become tokens (the
toy world, which has no pretrained vision model; the toy judge is not used because it is the
evaluation's own eye and must stay independent of the method).

This module is Ray-free and trainer-free; the trainer is :mod:`dreamfleet.trainers.profusion`
and the sampler :mod:`dreamfleet.core.fusion`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamfleet.core.artifacts import read_record
from dreamfleet.core.errors import ConfigError, DataError

PROMPTNET_FILE = "promptnet.json"
PROMPTNET_WEIGHTS = "promptnet.safetensors"
PROMPTNET_SCHEMA_VERSION = 1
PLACEHOLDER = "[S*]"  # stands for the subject in ProFusion prompts
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class PromptNetArch:
    """The shape of a PromptNet (recorded in promptnet.json)."""

    image_encoder: str = "vae"
    """"vae" (the base's own VAE encoder) or a CLIPVisionModel folder / hub id"""
    feature_channels: int = 128
    """channels of each feature map's projection before concatenation (the paper's 128)"""
    k: int | None = None
    """kernel = stride of the output conv; None: H_latent/8 at the native latent size (one token)"""


class VaeImageEncoder(nn.Module):
    """The base's VAE encoder as PromptNet's image encoder: latent positions -> tokens (frozen)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scale = float(vae.config.scaling_factor)

    @property
    def hidden_size(self) -> int:
        return int(self.vae.config.latent_channels)

    def num_tokens(self, resolution: int) -> int:
        side = resolution // 2 ** (len(self.vae.config.block_out_channels) - 1)
        return side * side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mean * self.scale
        return z.flatten(2).transpose(1, 2)


class ClipImageEncoder(nn.Module):
    """A CLIP vision model's ``last_hidden_state`` of the reference (frozen), CLIP-normalised."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def num_tokens(self, resolution: int) -> int:
        c = self.model.config
        return (c.image_size // c.patch_size) ** 2 + 1

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = int(self.model.config.image_size)
        x = F.interpolate((pixels.float() + 1) / 2, size=(size, size), mode="bicubic", align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.model.dtype)
        return self.model(pixel_values=x).last_hidden_state


def load_image_encoder(spec: str, base) -> nn.Module:
    """``"vae"`` or a CLIPVisionModel folder / hub id (read from the local files only)."""
    if spec == "vae":
        return VaeImageEncoder(base.vae).requires_grad_(False)
    from transformers import CLIPVisionModel

    try:
        model = CLIPVisionModel.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise ConfigError(f"image encoder {spec!r}: not a CLIPVisionModel folder or cached hub id ({e}); "
                          "give a local folder, or 'vae' to use the base model's own VAE") from e
    return ClipImageEncoder(model.eval()).requires_grad_(False)


def _encoder_half(unet_config: dict) -> nn.ModuleDict:
    from diffusers import UNet2DConditionModel

    u = UNet2DConditionModel.from_config(unet_config)
    if u.config.class_embed_type or u.config.addition_embed_type:
        raise ConfigError("PromptNet takes a Stable Diffusion 1.x/2.x UNet (no class or added embeddings)")
    return nn.ModuleDict({"conv_in": u.conv_in, "time_proj": u.time_proj, "time_embedding": u.time_embedding,
                          "down_blocks": u.down_blocks, "mid_block": u.mid_block})


def _map_sides(unet_config: dict, latent: int) -> list[int]:
    """Spatial side of each of PromptNet's feature maps at a latent side."""
    sides, s = [latent], latent
    for i in range(len(unet_config["down_block_types"])):
        if i < len(unet_config["down_block_types"]) - 1:
            s = math.ceil(s / 2)
        sides.append(s)
    return [*sides, s]


class PromptNet(nn.Module):
    """(x̄0, t, image tokens, x_t) -> S*: ``[batch, N, text hidden size]``."""

    def __init__(self, unet_config: dict, text_dim: int, image_dim: int, arch: PromptNetArch):
        super().__init__()
        self.arch, self.unet_config = arch, dict(unet_config)
        self.backbone = _encoder_half(self.unet_config)
        c_lat, c0 = int(unet_config["in_channels"]), int(unet_config["block_out_channels"][0])
        self.xt_in = nn.Sequential(nn.Conv2d(c_lat, c0, 3, padding=1), nn.SiLU(), nn.Conv2d(c0, c0, 3, padding=1))
        self.image_proj = nn.Linear(image_dim, int(unet_config["cross_attention_dim"]))
        latent = int(unet_config["sample_size"])
        self.side = max(1, latent // 8)
        self.k = arch.k or self.side
        if self.side % self.k:
            raise ConfigError(f"PromptNet k={self.k} must divide H_latent/8 = {self.side}")
        chans = [c0, *unet_config["block_out_channels"], unet_config["block_out_channels"][-1]]
        heads = []
        for c, s in zip(chans, _map_sides(self.unet_config, latent), strict=True):
            if s % self.side:
                raise ConfigError(f"a {s}x{s} feature map cannot be taken to {self.side}x{self.side}: choose a "
                                  "base whose latent side is a multiple of 8 times a power of two")
            heads.append(nn.Conv2d(c, arch.feature_channels, kernel_size=s // self.side, stride=s // self.side))
        self.heads = nn.ModuleList(heads)
        self.out = nn.Conv2d(arch.feature_channels * len(heads), text_dim, kernel_size=self.k, stride=self.k)

    @classmethod
    def from_unet(cls, unet, text_dim: int, image_dim: int, arch: PromptNetArch) -> PromptNet:
        """A PromptNet whose backbone starts as ``unet``'s encoder half (the new layers: PyTorch's init)."""
        net = cls(dict(unet.config), text_dim, image_dim, arch)
        own = {k: v for k, v in unet.state_dict().items() if k.split(".")[0] in net.backbone}
        missing, unexpected = net.backbone.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ConfigError(f"PromptNet backbone does not match the UNet: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        return net.to(unet.device)

    def num_tokens(self, latent_side: int | None = None) -> int:
        """N = (H_latent / (8k))² (at the native latent side by default)."""
        side = self.side if latent_side is None else max(1, latent_side // 8)
        return (side // self.k) ** 2

    def forward(self, x0: torch.Tensor, t: torch.Tensor, image_tokens: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        t = torch.as_tensor(t, device=x0.device).reshape(-1).expand(x0.shape[0])
        emb = b["time_embedding"](b["time_proj"](t).to(x0.dtype))
        h = b["conv_in"](x0) + self.xt_in(xt)
        context = self.image_proj(image_tokens)
        feats = [h]
        for block in b["down_blocks"]:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, temb=emb, encoder_hidden_states=context)
            else:
                h, _ = block(h, temb=emb)
            feats.append(h)
        h = b["mid_block"](h, emb, encoder_hidden_states=context)
        feats.append(h)
        z = torch.cat([head(f) for head, f in zip(self.heads, feats, strict=True)], dim=1)
        return self.out(z).flatten(2).transpose(1, 2)


def embeddings_of(text_encoder) -> nn.Module:
    """The token-plus-position embedding module (``text_model.embeddings`` before transformers 5)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings


class Injector:
    """Overwrites the text encoder's input hidden states at the placeholder positions.

    A forward hook on the text encoder's ``embeddings`` (token plus position embedding):
    inside :meth:`inject`, the output rows where ``mask`` is true become ``tokens`` (row-major,
    N per prompt that names the subject; a prompt that does not is left alone); outside it the
    text encoder is untouched.
    """

    def __init__(self, text_encoder):
        self.mask: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.handle = embeddings_of(text_encoder).register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.mask is None:
            return output
        if self.mask.shape != output.shape[:2]:
            raise ValueError(f"placeholder mask {tuple(self.mask.shape)} does not match the embeddings "
                             f"{tuple(output.shape[:2])}")
        out = output.clone()
        named = self.mask.any(1)  # prompts without the placeholder (say the plain class prompt) stay as they are
        out[self.mask] = self.tokens[named].reshape(-1, out.shape[-1]).to(out.dtype)
        return out

    @contextlib.contextmanager
    def inject(self, mask: torch.Tensor, tokens: torch.Tensor) -> Iterator[None]:
        counts = mask.sum(1)
        if not bool(((counts == tokens.shape[1]) | (counts == 0)).all()):
            raise ValueError(f"each prompt needs {tokens.shape[1]} placeholder token(s) or none; found {counts.tolist()}")
        self.mask, self.tokens = mask, tokens
        try:
            yield
        finally:
            self.mask = self.tokens = None

    def remove(self) -> None:
        self.handle.remove()


@dataclass
class PromptNetInfo:
    """promptnet.json: what a pre-trained (or customised) PromptNet is and how it was made."""

    base_model: dict[str, Any]
    arch: dict[str, Any]
    placeholder_token: str
    text_dim: int
    image_dim: int
    config: dict[str, Any]
    code_version: dict[str, Any]
    input_hash: str
    dataset: dict[str, Any]
    final_loss: float | None
    wall_time_s: float
    created_at: str
    train_stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = PROMPTNET_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> PromptNetInfo:
        return read_record(cls, Path(folder) / PROMPTNET_FILE, PROMPTNET_SCHEMA_VERSION,
                           missing=f"{folder}: not a PromptNet folder (no {PROMPTNET_FILE}); make one with "
                                   "`dreamfleet profusion pretrain`",
                           newer="{path}: written by a newer dreamfleet (PromptNet schema {version}); upgrade dreamfleet")


def load_promptnet(folder: str | Path, base) -> tuple[PromptNet, PromptNetInfo]:
    """A PromptNet from its folder, for ``base`` (refused when built for another base model)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info = PromptNetInfo.read(folder)
    if info.base_model.get("hash") != base.model_hash:
        raise ConfigError(f"{folder}: PromptNet was pre-trained on base {info.base_model.get('spec')!r} "
                          f"(hash {info.base_model.get('hash')}), not on {base.spec!r} ({base.model_hash}); "
                          "pre-train one for this base with `dreamfleet profusion pretrain`")
    net = PromptNet(dict(base.unet.config), info.text_dim, info.image_dim, PromptNetArch(**info.arch))
    net.load_state_dict(load_file(str(folder / PROMPTNET_WEIGHTS)), strict=True)
    return net.eval(), info


def reference_inputs(photo, vae, image_encoder: nn.Module, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̄0, image tokens) of a reference photo: the VAE latent mean, scaled, and the encoder's tokens."""
    from dreamfleet.core.apprentice import pixels

    x = pixels(photo, resolution).unsqueeze(0).to(vae.device, vae.dtype)
    x0 = vae.encode(x).latent_dist.mean * float(vae.config.scaling_factor)
    return x0, image_encoder(x)


@dataclass
class PromptNetConditioning:
    """C and C^γ with S* from PromptNet at the current latent and timestep (fusion.Conditioning)."""

    uncond: torch.Tensor
    reference: torch.Tensor | None
    subject: PromptNetSubject
    encode: Any
    ids: torch.Tensor
    mask: torch.Tensor
    gamma: float
    injector: Injector

    def personal(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from dreamfleet.core.fusion import scale_positions

        s = self.subject.tokens(x, t)
        with self.injector.inject(self.mask, s):
            h = self.encode(self.ids)
        return h, scale_positions(h, self.mask, self.gamma)

    def close(self) -> None:
        """Take the hook off the text encoder (shared with other requests in serving)."""
        self.injector.remove()


@dataclass
class PromptNetSubject:
    """A ProFusion subject at sampling time: its PromptNet, placeholder token and reference,
    the reference's (x̄0, image tokens) given per latent side (S* follows the latent size)."""

    promptnet: PromptNet
    placeholder: str
    reference: Any  # latent side -> (x̄0 [1, C, h, w], image tokens [1, T, D_image])

    @classmethod
    def fixed(cls, promptnet: PromptNet, placeholder: str, x0: torch.Tensor, tokens: torch.Tensor) -> PromptNetSubject:
        """A subject whose reference inputs are given (sampled at their latent side only)."""
        def reference(side: int) -> tuple[torch.Tensor, torch.Tensor]:
            if side != x0.shape[-1]:
                raise ValueError(f"this subject's reference is {x0.shape[-1]} latent pixels a side, not {side}")
            return x0, tokens

        return cls(promptnet, placeholder, reference)

    def expand(self, prompt: str, latent_side: int) -> str:
        """``[S*]`` -> the placeholder, repeated N times where S* has N tokens at this latent side."""
        n = self.promptnet.num_tokens(latent_side)
        words = [" ".join([self.placeholder] * n) if w in (PLACEHOLDER, self.placeholder) else w
                 for w in prompt.replace(PLACEHOLDER, f" {PLACEHOLDER} ").split()]
        return " ".join(words)

    def to(self, device) -> None:
        self.promptnet.to(device)

    def tokens(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x0, image_tokens = self.reference(x.shape[-1])
        return self.promptnet(x0.expand(b, -1, -1, -1), t, image_tokens.expand(b, -1, -1), x)

    def conditioning(self, fp, ids, mask, uncond, ref, gamma: float) -> PromptNetConditioning:
        """The request's conditioning; its hook on ``fp``'s text encoder lives until ``close()``."""
        return PromptNetConditioning(uncond, ref, self, fp.encode, ids, mask, gamma, Injector(fp.pipe.text_encoder))


@dataclass
class ProFusionWeights:
    """What a ``profusion`` expert holds besides its q/k/v LoRA: its PromptNet and its one photo."""

    promptnet: PromptNet
    info: PromptNetInfo
    photo: Any  # PIL image
    cache: dict = field(default_factory=dict)  # (device, side) -> (x̄0, image tokens)
    encoder: Any = None

    def reference_inputs(self, vae, base, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The photo's (x̄0, image tokens) at ``side`` pixels on the VAE's device, computed once each."""
        key = (str(vae.device), side)
        if key not in self.cache:
            if self.encoder is None:
                self.encoder = load_image_encoder(self.info.arch.get("image_encoder", "vae"), base)
            with torch.no_grad():
                self.cache[key] = reference_inputs(self.photo, vae, self.encoder.to(vae.device), side)
        return self.cache[key]

    @classmethod
    def read(cls, folder: str | Path, base) -> ProFusionWeights:
        from PIL import Image

        net, info = load_promptnet(Path(folder) / "promptnet", base)
        photo = Path(folder) / "instance" / "00.png"
        if not photo.is_file():
            raise DataError(f"{folder}: a ProFusion expert without its photo (instance/00.png); publish it again")
        with Image.open(photo) as im:
            return cls(net, info, im.convert("RGB"))


def fusion_pipeline(pipe, expert_info, weights: ProFusionWeights, base):
    """A :class:`~dreamfleet.core.fusion.FusionPipeline` for a ProFusion expert over ``pipe``
    (whose UNet already carries the expert's q/k/v LoRA)."""
    from dreamfleet.core.fusion import FusionPipeline

    net = weights.promptnet.to(pipe.unet.device, pipe.unet.dtype)
    scale = pipe.vae_scale_factor
    subject = PromptNetSubject(net, expert_info.identifier,
                               lambda side: weights.reference_inputs(pipe.vae, base, side * scale))
    return FusionPipeline(pipe, identifier=expert_info.identifier, class_noun=expert_info.class_noun, subject=subject)
