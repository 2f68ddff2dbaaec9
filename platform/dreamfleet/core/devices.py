"""Where models run: one device policy (CUDA when the machine has it) and the inference dtype."""

from __future__ import annotations

import torch

from dreamfleet.core.errors import ConfigError


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else the CPU. Any other name is taken as given, except
    a CUDA device on a machine without CUDA, which is refused here rather than deep in torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def inference_dtype(device: torch.device) -> torch.dtype:
    """The dtype frozen weights are served in: float16 on CUDA, float32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32
