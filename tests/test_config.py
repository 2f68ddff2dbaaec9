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


def test_sections_are_shared_and_taken_as_they_are():
    """DreamBooth's and the apprentice's configs are the same optimizer and loop sections (one
    default per setting: the AdamW betas, epsilon and decay exist once), and the loop takes a
    config as those sections, without copying fields."""
    import dataclasses

    from dreamfleet.trainers.apprentice import ApprenticeConfig
    from dreamfleet.trainers.config import LoopConfig, OptimizerConfig
    from dreamfleet.trainers.loop import LoopSettings, make_optimizer

    tc, ac = TrainConfig(adam_beta2=0.99), ApprenticeConfig(adam_beta2=0.98)
    for c in (tc, ac):
        assert isinstance(c, OptimizerConfig) and isinstance(c, LoopConfig)
    shared = {f.name for f in dataclasses.fields(OptimizerConfig)} | {f.name for f in dataclasses.fields(LoopConfig)}
    assert shared <= {f.name for f in dataclasses.fields(ApprenticeConfig)}
    assert (ac.adam_beta1, ac.adam_epsilon) == (OptimizerConfig.adam_beta1, OptimizerConfig.adam_epsilon)
    import torch

    param = torch.nn.Parameter(torch.zeros(2))
    for c, beta2 in ((tc.resolve(native_resolution=32), 0.99), (ac, 0.98)):
        s = LoopSettings(c, c)
        assert s.optimizer is c and s.loop is c
        assert make_optimizer([param], s).param_groups[0]["betas"] == (0.9, beta2)
    with pytest.raises(ConfigError, match="adam_beta2"):
        ApprenticeConfig(adam_beta2=1.5)


def test_subject_config_is_resolved_once_and_immutable():
    """The driver merges the run config with a manifest record's overrides and fills every
    default in one step; the result is frozen, and resolving it again is itself."""
    from types import SimpleNamespace

    from dreamfleet.trainers.config import subject_config

    run = TrainConfig(steps=8, lora_rank=8)
    record = SimpleNamespace(subject_id="dog1", train_overrides={"prior_loss_weight": 0.5}, steps=None,
                             learning_rate=None, method="full")
    c = subject_config(run, record, native_resolution=64)
    assert (c.method, c.learning_rate, c.resolution, c.lora_alpha, c.prior_loss_weight, c.steps) == \
        ("full", 5e-6, 64, 8, 0.5, 8)
    assert c.is_resolved and c.resolve(native_resolution=128) is c
    with pytest.raises(AttributeError):
        c.steps = 3  # frozen: what the driver resolved is what the worker trains with
    bad = SimpleNamespace(subject_id="bad", train_overrides=None, steps=None, learning_rate=-1.0, method=None)
    with pytest.raises(ConfigError, match=r"'learning_rate' must be positive, got -1\.0"):
        subject_config(run, bad, native_resolution=64)
