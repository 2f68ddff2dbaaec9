"""PEFT LoRA adapters in diffusers' format, as in diffusers' train_dreambooth_lora.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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


def add_lora(module: torch.nn.Module, rank: int, alpha: int, targets: list[str], *, seed: int) -> None:
    """Freeze ``module`` and add a trainable LoRA adapter ("default") on ``targets``.

    PEFT initialises A from the global RNG; a forked, seeded RNG makes the init a function of
    ``seed`` alone, so two runs with the same seed start from the same adapter.
    """
    from peft import LoraConfig

    module.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))


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


def write_lora(folder: Path, unet: LoraWeights, text_encoder: LoraWeights | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights(folder)``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    def layers(w: LoraWeights) -> dict[str, torch.Tensor]:
        sd = convert_state_dict_to_diffusers(w.layers)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    kwargs = {"unet_lora_layers": layers(unet), "unet_lora_adapter_metadata": unet.metadata}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = layers(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.metadata
    StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def save_lora(
    folder: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    unet_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the PEFT adapters of ``unet`` (and ``text_encoder``) with :func:`write_lora`.

    ``unet_state``: see :func:`lora_weights`.
    """
    te = lora_weights(text_encoder) if text_encoder is not None else None
    return write_lora(folder, lora_weights(unet, unet_state), te)
