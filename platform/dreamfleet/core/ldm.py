"""Stable Diffusion 1.x weights in the original (LDM / CompVis) single-file layout.

The layout A1111, ComfyUI and diffusers' ``from_single_file`` read: ``model.diffusion_model.*``
(the UNet as ``input_blocks``/``middle_block``/``output_blocks``), ``first_stage_model.*`` (the
VAE as ``encoder.down.i.block.j``, ``decoder.up.i``, ``mid.block_1``/``attn_1``) and
``cond_stage_model.transformer.*`` (the CLIP text encoder as it is). The block numbering is
derived from the UNet's config (blocks, ``layers_per_block``), so any SD 1.x-shaped UNet maps,
the tiny test ones included.
"""

from __future__ import annotations

import torch

RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix, for every block of the UNet."""
    per = config["layers_per_block"] + 1  # LDM counts each down block's downsampler as one more input block
    n = len(config["down_block_types"])
    out = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
           "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(per - 1):
            out[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{1 + i * per + j}.0."
            out[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{1 + i * per + j}.1."
        out[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(i + 1) * per}.0.op."
        has_attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per):
            out[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{i * per + j}.0."
            out[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{i * per + j}.1."
        out[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}."
    return out


def _unet_key(key: str, prefixes: dict[str, str]) -> str:
    module, _, param = key.rpartition(".")
    if module in UNET_TOP:
        return f"{UNET_TOP[module]}.{param}"
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            if ".resnets." in old:  # a resnet's own layers have LDM names too
                rest = next((ldm + rest[len(d):] for d, ldm in RESNET if rest.startswith(d + ".")), rest)
            return new + rest
    return key


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(config)
    return {f"model.diffusion_model.{_unet_key(k, prefixes)}": v for k, v in state.items()}


def vae_to_ldm(state: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        for i in range(num_blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{num_blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{num_blocks - 1 - i}.upsample.")
        for k in range(2):
            new = new.replace(f"mid_block.resnets.{k}.", f"mid.block_{k + 1}.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, ldm in VAE_ATTENTION:
                new = new.replace(f"attn_1.{old}.", f"attn_1.{ldm}.")
            if new.endswith(".weight") and value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value.reshape(*value.shape, 1, 1)
        out[f"first_stage_model.{new}"] = value
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x's CLIP text encoder keeps its transformers names under ``cond_stage_model.transformer``,
    as ``text_model.*`` (transformers >= 5.6 flattened ``CLIPTextModel``'s own keys to ``embeddings.*``)."""
    return {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v
            for k, v in state.items()}
