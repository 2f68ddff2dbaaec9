"""The toy Flux: a ``FluxTransformer2DModel`` pretrained with the rectified-flow objective on
the toy world, so DreamBooth on a flow-matching DiT can be measured on a CPU.

The components are Flux.1's (a CLIP text encoder for the pooled vector, a T5 encoder for the
sequence, a double- and single-stream MMDiT on 2x2-packed latents, FlowMatchEuler with dynamic
shifting); only the sizes are small. What differs from Flux.1-dev, on purpose:

- the transformer has **no guidance embedding**: [dev]'s is distilled from a teacher, which a
  one-hour pretraining cannot afford. It is trained with 10% empty captions instead and sampled
  with true classifier-free guidance (``true_cfg``, see :func:`dreamfleet.core.families.flux.guided_flux_pipeline`);
- the VAE and the CLIP text encoder start from the toy UNet model's (the VAE frozen, with a
  Flux-style latent shift and scale measured on the world); T5 and the transformer are new.

``load_base("toy-flux")`` loads the shipped folder ``assets/toy-flux/``. This module imports
only core (and the toy UNet model it starts from).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from dreamfleet.core.errors import ModelError
from dreamfleet.core.models import BaseModel, load_folder, state_dict_hash
from dreamfleet.toy.model import MAX_TOKENS, RESOLUTION, load_toy

TOY_FLUX_SPEC = "toy-flux"
TOY_FLUX_DIR = Path(__file__).resolve().parent / "assets" / "toy-flux"


def toy_flux_configs(t5_vocab_size: int) -> dict[str, dict]:
    """Configs of the toy Flux: transformer 2.6 M parameters (3 double + 3 single blocks of width
    128), T5 0.3 M; 32 px images, 16x16x4 latents packed into 64 tokens of 16 channels."""
    return {
        "transformer": dict(
            patch_size=1, in_channels=16, num_layers=3, num_single_layers=3, attention_head_dim=32,
            num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64,
            axes_dims_rope=[8, 12, 12], guidance_embeds=False,
        ),
        "text_encoder_2": dict(
            vocab_size=t5_vocab_size, d_model=128, d_ff=256, d_kv=32, num_layers=2, num_heads=4,
            relative_attention_num_buckets=16, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            # No dropout: T5's default 0.1 draws from the global RNG, so no run would repeat
            # itself or resume exactly (the shipped model was trained with it; docs/toy_world.md).
            dropout_rate=0.0,
        ),
        # Flux.1's dynamic shifting, anchored at the toy's 64 image tokens (shift e^0.5 there).
        "scheduler": dict(
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=64, max_image_seq_len=1024,
        ),
    }


def build_untrained_flux(seed: int = 0, toy: BaseModel | None = None) -> BaseModel:
    """The toy Flux before pretraining: a new transformer and T5, the toy model's VAE and CLIP."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from dreamfleet.core.tokenizer import build_tiny_t5_tokenizer

    toy = toy or load_toy()
    tokenizer_2 = build_tiny_t5_tokenizer(model_max_length=MAX_TOKENS)
    cfgs = toy_flux_configs(len(tokenizer_2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**cfgs["transformer"])
        text_encoder_2 = T5EncoderModel(T5Config(**cfgs["text_encoder_2"]))
    vae = copy.deepcopy(toy.vae)
    vae.register_to_config(shift_factor=0.0)  # measured on the world before training (set_latent_stats)
    modules = (transformer, vae, toy.text_encoder, text_encoder_2)
    return BaseModel(
        spec="toy-flux-untrained", family="flux", transformer=transformer, vae=vae,
        text_encoder=copy.deepcopy(toy.text_encoder), tokenizer=copy.deepcopy(toy.tokenizer),
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        noise_scheduler=FlowMatchEulerDiscreteScheduler(**cfgs["scheduler"]),
        model_hash=state_dict_hash(*modules), extra={"resolution": RESOLUTION, "true_cfg": True},
    )


def load_toy_flux(folder: str | Path | None = None) -> BaseModel:
    """The pretrained toy Flux shipped in the repository (``load_base("toy-flux")``)."""
    folder = Path(folder) if folder is not None else TOY_FLUX_DIR
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"the toy Flux is not at {folder}; build it with `make toy-flux` "
            f"(or `dreamfleet toy pretrain --model toy-flux --out {folder}`)"
        )
    base = load_folder(folder, spec=TOY_FLUX_SPEC)
    for tok in (base.tokenizer, base.tokenizer_2):
        tok.model_max_length = MAX_TOKENS  # what it was trained at; pipelines pad to it
    return base
