"""PEFT LoRA adapters in diffusers' format, as in diffusers' train_dreambooth_lora.py."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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


def save_lora(
    folder: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    unet_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights(folder)``.

    ``unet_state`` is a full state dict to take the adapter from instead of the module's own
    parameters (under ZeRO-3 the module holds only a shard).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def state(m: torch.nn.Module, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(m, state_dict=full))
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    kwargs = {"unet_lora_layers": state(unet, unet_state), "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = state(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(save_directory=str(folder), safe_serialization=True, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"
