"""PEFT LoRA adapters in diffusers' format, as in diffusers' train_dreambooth_lora.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dreamfleet.core.families import Family
from dreamfleet.core.families.sd import UNET_TARGETS as _SD_TARGETS
from dreamfleet.core.models import BaseModel

UNET_TARGETS = list(_SD_TARGETS)


@dataclass
class LoraWeights:
    """One adapter: its tensors in PEFT's key format (``<module>.lora_A.weight`` [r, in],
    ``<module>.lora_B.weight`` [out, r]) and its ``LoraConfig`` as a dict."""

    layers: dict[str, torch.Tensor]
    metadata: dict

    @property
    def scale(self) -> float:
        """PEFT's scaling of the adapter's output, ``lora_alpha / r``."""
        return self.metadata["lora_alpha"] / self.metadata["r"]


def add_lora(module: torch.nn.Module, rank: int, alpha: int, targets: list[str], *, seed: int,
             use_dora: bool = False) -> None:
    """Freeze ``module`` and add a trainable LoRA adapter ("default") on ``targets`` (DoRA with
    ``use_dora``: PEFT adds a magnitude vector per layer, initialised from the base weight).

    PEFT initialises A from the global RNG; a forked, seeded RNG makes the init a function of
    ``seed`` alone, so two runs with the same seed start from the same adapter.
    """
    from peft import LoraConfig

    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                                      use_dora=use_dora))


def lora_weights(module: torch.nn.Module, full_state: dict[str, torch.Tensor] | None = None) -> LoraWeights:
    """The "default" adapter of a PEFT-injected ``module`` as fp32 CPU tensors.

    ``full_state`` is a full state dict to take the adapter from instead of the module's own
    parameters (under ZeRO-3 the module holds only a shard).
    """
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(module, state_dict=full_state)
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    return LoraWeights(layers, module.peft_config["default"].to_dict())


def initial_lora(unet: torch.nn.Module, rank: int, alpha: int, targets: list[str], *, seed: int) -> LoraWeights:
    """The adapter :func:`add_lora` starts from with ``seed`` (rounded through the UNet's
    dtype, as PEFT casts it to the base layer's), leaving ``unet`` without it."""
    add_lora(unet, rank, alpha, targets, seed=seed)
    weights = lora_weights(unet)
    unet.unload_lora()
    return weights


def write_lora(folder: Path, adapters: dict[str, LoraWeights], family: Family) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` for ``{component: adapter}`` with the family
    pipeline's ``save_lora_weights``, loadable by its ``load_lora_weights(folder)``."""
    from diffusers.utils import convert_state_dict_to_diffusers

    def layers(w: LoraWeights) -> dict[str, torch.Tensor]:
        sd = convert_state_dict_to_diffusers(w.layers) if family.convert_lora_keys else w.layers
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    family.save_lora(folder, {c: layers(w) for c, w in adapters.items()}, {c: w.metadata for c, w in adapters.items()})
    return folder / "pytorch_lora_weights.safetensors"


def save_lora(folder: Path, base: BaseModel, *, text_encoders: bool,
              denoiser_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the PEFT adapters of the base's denoiser (and text encoders) with :func:`write_lora`.

    ``denoiser_state``: see :func:`lora_weights`.
    """
    adapters = {base.kind.denoiser: lora_weights(base.denoiser, denoiser_state)}
    if text_encoders:
        adapters.update({name: lora_weights(m) for name, m in base.text_encoders.items()})
    return write_lora(folder, adapters, base.kind)
