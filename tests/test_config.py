"""Config dataclasses: the CLI, recipes and manifests resolve to the same objects."""

from __future__ import annotations

import argparse
import json

import pytest

from dreamfleet.core import config as C
from dreamfleet.core.errors import ConfigError
from dreamfleet.trainers.config import TrainConfig


def test_from_dict_coerces_and_refuses_unknown():
    cfg = C.from_dict(TrainConfig, {"steps": "12", "method": "full", "validation_prompts": "a,b"})
    assert cfg.steps == 12 and cfg.method == "full" and cfg.validation_prompts == ["a", "b"]
    with pytest.raises(ConfigError, match=r"unknown config field.*stpes"):
        C.from_dict(TrainConfig, {"stpes": 3})
    with pytest.raises(ConfigError, match="'method' is 'dora'; choose one of lora, full"):
        C.from_dict(TrainConfig, {"method": "dora"})
    with pytest.raises(ConfigError, match="'steps' must be int"):
        C.from_dict(TrainConfig, {"steps": "many"})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="'steps' must be at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(ConfigError, match="multiple of 8"):
        TrainConfig(resolution=30)
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        TrainConfig(steps=5, lr_warmup_steps=10)


def test_resolve_fills_method_defaults():
    assert TrainConfig(method="lora").resolve(native_resolution=32).learning_rate == 1e-4
    full = TrainConfig(method="full").resolve(native_resolution=512)
    assert full.learning_rate == 5e-6 and full.resolution == 512 and full.class_prompt == "a {class_noun}"


def test_cli_flags_and_recipe_resolve_to_the_same_config(tmp_path):
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, TrainConfig)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"steps": 50, "lora_rank": 8}))
    args = parser.parse_args(["--steps", "60", "--no-with-prior-preservation"])
    data = C.load_recipe(recipe)
    data.update(C.overrides_from_args(TrainConfig, args))
    cfg = C.from_dict(TrainConfig, data)
    assert (cfg.steps, cfg.lora_rank, cfg.with_prior_preservation) == (60, 8, False)
    assert C.to_dict(cfg)["steps"] == 60


def test_bad_recipe_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        C.load_recipe(bad)
