"""The toy base model: shipped, loadable as "toy", pretrained by the project's own script."""

from __future__ import annotations

import pytest
import torch
from helpers import shipped_base_record

from dreamfleet.core.models import load_base
from dreamfleet.toy.model import MAX_TOKENS, TOY_MODEL_DIR, load_toy
from dreamfleet.toy.pretrain import PretrainConfig, pretrain


def test_shipped_model_is_small_safetensors_with_its_record():
    record = shipped_base_record(TOY_MODEL_DIR)
    for key in ("script", "seed", "vae_steps", "unet_steps", "wall_time_s", "unet_loss", "config", "code_version"):
        assert key in record, key
    assert record["wall_time_s"] <= 60 * 60


def test_load_base_toy_is_a_standard_base_model():
    base = load_base("toy")
    assert base.spec == "toy" and base.family == "sd"
    assert base.resolution == 32
    assert base.tokenizer.model_max_length == MAX_TOKENS
    assert len(base.tokenizer("a red ball on the beach").input_ids) == 8
    assert base.model_hash == load_base("toy").model_hash
    pipe = base.pipeline()
    g = torch.Generator("cpu").manual_seed(0)
    img = pipe("a red ball", height=32, width=32, num_inference_steps=2, generator=g).images[0]
    assert img.size == (32, 32)


def test_pretrain_script_end_to_end_is_deterministic(tmp_path):
    c = PretrainConfig(minutes=0.0, vae_steps=2, unet_steps=3, pool_size=48, batch_size=4, checkpoint_every=0)
    a = pretrain(c, tmp_path / "a", progress=False)
    b = pretrain(c, tmp_path / "b", progress=False)
    assert a["weights_hash"] == b["weights_hash"]
    assert (a["vae_steps"], a["unet_steps"]) == (2, 3)
    base = load_toy(tmp_path / "a")
    assert base.resolution == 32
    assert float(base.vae.config.scaling_factor) == pytest.approx(a["latent_scaling_factor"])
    with pytest.raises(Exception, match="already holds a model"):
        pretrain(c, tmp_path / "a")


def test_missing_toy_model_is_a_clear_error(tmp_path):
    from dreamfleet.core.errors import ModelError

    with pytest.raises(ModelError, match="make toy-model"):
        load_toy(tmp_path)
