"""Tiny models of the newer families, built from configs in code with a fixed seed (for tests
and CPU benchmarks; nothing is downloaded), in the style of diffusers' ``get_dummy_components``.

Each generates noise, but has the real architecture: the trainers, packing, serving and the
stock diffusers pipelines run on it exactly as on the full-size model.
"""

from __future__ import annotations

import torch

from dreamfleet.core.models import TINY_SEED, BaseModel, state_dict_hash, tiny_configs
from dreamfleet.core.tokenizer import build_tiny_qwen_tokenizer, build_tiny_t5_tokenizer, build_tiny_tokenizer

TINY_RESOLUTION = 32


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    cfg = tiny_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return CLIPTextConfig(**cfg["text_encoder"], **extra)


def _ddpm_scheduler():
    from diffusers import DDPMScheduler

    cfg = tiny_configs(1, 0, 0, 0)["scheduler"]
    scheduler = DDPMScheduler(**{k: v for k, v in cfg.items() if k != "set_alpha_to_one"})
    return DDPMScheduler.from_config({k: v for k, v in scheduler.config.items() if k != "_use_default_values"})


def _t5_config(tokenizer, d_model: int):
    from transformers import T5Config

    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def _flow_vae_config() -> dict:
    """The tiny VAE with the shift and scale of the flow-matching families' VAEs (diffusers' test values)."""
    return {**tiny_configs(1, 0, 0, 0)["vae"], "shift_factor": 0.0609, "scaling_factor": 1.5035,
            "use_quant_conv": False, "use_post_quant_conv": False}


def build_tiny_sdxl() -> BaseModel:
    """SDXL-shaped: two CLIP encoders (32 + 32 hidden), text_time micro-conditioning, 32 px."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    unet_cfg = {**tiny_configs(len(tokenizer), 0, 0, 0)["unet"], "cross_attention_dim": 64,
                "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**tiny_configs(1, 0, 0, 0)["vae"])
        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32))
    modules = (unet, vae, text_encoder, text_encoder_2)
    return BaseModel(
        spec="tiny-sdxl", family="sdxl", unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
        tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(), tokenizer_2=build_tiny_tokenizer(),
        noise_scheduler=_ddpm_scheduler(), model_hash=state_dict_hash(*modules),
    )


def build_tiny_flux() -> BaseModel:
    """Flux-shaped: CLIP pooled + T5 sequence, one double and one single block, guidance
    embedding (as [dev]), 4 latent channels packed 2x2, 32 px."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer()
    t5, vae_cfg = _t5_config(tokenizer_2, d_model=32), _flow_vae_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
            guidance_embeds=True)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(_clip_config(tokenizer))
        text_encoder_2 = T5EncoderModel(t5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    modules = (transformer, vae, text_encoder, text_encoder_2)
    return BaseModel(
        spec="tiny-flux", family="flux", transformer=transformer.eval(), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2, noise_scheduler=scheduler, model_hash=state_dict_hash(*modules),
        extra={"resolution": TINY_RESOLUTION},
    )


def build_tiny_sd3() -> BaseModel:
    """SD3-shaped: CLIP-L and CLIP-G (with projections) + T5, one joint block, 2x2 patches, 32 px."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer, tokenizer_3 = build_tiny_tokenizer(), build_tiny_t5_tokenizer(model_max_length=256)
    t5, vae_cfg = _t5_config(tokenizer_3, d_model=64), _flow_vae_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, projection_dim=32))
        text_encoder_3 = T5EncoderModel(t5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    modules = (transformer, vae, text_encoder, text_encoder_2, text_encoder_3)
    return BaseModel(
        spec="tiny-sd3", family="sd3", transformer=transformer.eval(), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=build_tiny_tokenizer(), text_encoder_3=text_encoder_3.eval(), tokenizer_3=tokenizer_3,
        noise_scheduler=scheduler, model_hash=state_dict_hash(*modules),
    )


def build_tiny_zimage() -> BaseModel:
    """Z-Image-shaped: a Qwen3 text encoder, two single-stream blocks after one refiner block
    each for noise and caption, 16 latent channels in 2x2 patches, 32 px."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = build_tiny_qwen_tokenizer()
    vae_cfg = {**tiny_configs(1, 0, 0, 0)["vae"], "latent_channels": 16, "shift_factor": 0.1159,
               "scaling_factor": 0.3611}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
            t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = Qwen3Model(Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    modules = (transformer, vae, text_encoder)
    return BaseModel(
        spec="tiny-zimage", family="zimage", transformer=transformer.eval(), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, noise_scheduler=scheduler,
        model_hash=state_dict_hash(*modules), extra={"resolution": TINY_RESOLUTION},
    )
