"""A QLoRA-style frozen base (Dettmers et al. 2023): the denoiser's linear layers stored in
4-bit NormalFloat with bitsandbytes, computed in the training dtype, LoRA adapters on top in
fp32. Only the adapters are trained and saved, so the expert loads in the unquantised stock
pipeline as any other LoRA expert."""

from __future__ import annotations

import torch


def quantize_nf4(module: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a frozen NF4 ``bnb.nn.Linear4bit`` on
    ``device``; returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu", torch.float32), requires_grad=False,
                                         quant_type="nf4")
            # bitsandbytes repacks the weight in place for a CPU inference kernel the first time
            # it runs in eval mode (validation images): off, so training and validation share
            # one layout (the repacking also fails on layers under 32 outputs).
            q.support_avx512bf16_for_cpu = False
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, q.to(device))  # bitsandbytes quantises on the move
            replaced += 1
    return replaced
