"""The toy base model: configs, the untrained build, and the loader of the shipped weights.

Same diffusers components as every other base model (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel + the shared tiny CLIP tokenizer, DDPMScheduler), so trainers and serving
treat it like Stable Diffusion. It works at 32 px with 16x16x4 latents. The weights are
pretrained on the toy world by :mod:`dreamfleet.toy.pretrain` and shipped in
``assets/toy-model/`` (a standard diffusers folder, safetensors, with ``pretrain.json``).
This module is bottom-layer: it imports only core.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamfleet.core.errors import ModelError
from dreamfleet.core.models import BaseModel, load_folder, state_dict_hash

TOY_SPEC = "toy"
TOY_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "toy-model"
RESOLUTION = 32
# Toy prompts are under 20 tokens; a short context makes every cross-attention cheaper.
MAX_TOKENS = 32


def toy_configs(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> dict[str, dict]:
    """Configs of the toy model: ~3.6 M parameters (UNet 2.7 M), fp32 safetensors well under 20 MB."""
    return {
        "unet": dict(
            sample_size=RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            # Attention at 8x8 and 4x4 only: self-attention over 16x16 would cost most of the step.
            block_out_channels=(32, 64, 96),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=16,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=16,
            sample_size=RESOLUTION,
        ),
        "text_encoder": dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
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
            steps_offset=1,
        ),
    }


def build_untrained(seed: int = 0) -> BaseModel:
    """The toy model with freshly initialised weights (the start of pretraining)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamfleet.core.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(model_max_length=MAX_TOKENS)
    cfgs = toy_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    scheduler = DDPMScheduler(**cfgs["scheduler"])
    # Every default explicit, as on disk (see build_tiny_random for why).
    scheduler = DDPMScheduler.from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})
    return BaseModel(
        spec="toy-untrained", unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        noise_scheduler=scheduler, model_hash=state_dict_hash(unet, vae, text_encoder),
    )


def load_toy(folder: str | Path | None = None) -> BaseModel:
    """The pretrained toy model shipped in the repository (``load_base("toy")``)."""
    folder = Path(folder) if folder is not None else TOY_MODEL_DIR
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"the toy model is not at {folder}; build it with `make toy-model` "
            "(or `dreamfleet toy pretrain --out {folder}`)"
        )
    base = load_folder(folder, spec=TOY_SPEC)
    # The tokenizer's saved max length is what pipelines pad to; keep it as trained.
    base.tokenizer.model_max_length = MAX_TOKENS
    return base
