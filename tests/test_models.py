"""Base models: tiny-random from configs, local diffusers folders, hub ids offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dreamfleet.core.errors import ModelError
from dreamfleet.core.identifiers import check_identifier, choose_identifier, rare_token_candidates
from dreamfleet.core.models import load_base


@pytest.fixture(scope="module")
def tiny():
    return load_base("tiny-random")


def test_tiny_random_components_and_determinism(tiny):
    assert tiny.resolution == 32 and tiny.family == "sd"
    assert tiny.unet.config.block_out_channels == (32, 64)
    assert load_base("tiny-random").model_hash == tiny.model_hash
    ids = tiny.tokenizer("a photo of a dog").input_ids
    assert tiny.tokenizer.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>"]


def test_local_folder_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "sd")
    loaded = load_base(str(tmp_path / "sd"))
    assert loaded.spec == str((tmp_path / "sd").resolve()) and loaded.resolution == 32
    kw = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    a = tiny.pipeline()("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded.pipeline()("a dog", generator=torch.Generator().manual_seed(0), **kw).images
    np.testing.assert_array_equal(a, b)  # the same weights through the same kernels: bit for bit
    # the same folder hashes the same; a changed weight file changes the hash
    assert load_base(str(tmp_path / "sd")).model_hash == loaded.model_hash


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelError, match="not a diffusers model folder"):
        load_base(str(tmp_path))


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not be found in the local Hugging Face cache"):
        load_base("someone/some-model")


def test_unknown_spec():
    with pytest.raises(ModelError, match="not found"):
        load_base("no-such-model")


def test_rare_identifiers_are_single_tokens(tiny):
    cands = rare_token_candidates(tiny.tokenizer)
    assert "sks" in cands and len(cands) >= 20
    for word in cands:
        assert len(tiny.tokenizer(word, add_special_tokens=False).input_ids) == 1
    # common words are not "rare"
    assert not {"dog", "a", "the", "red"} & set(cands)
    assert choose_identifier(tiny.tokenizer, "dog1") == choose_identifier(tiny.tokenizer, "dog1")
    assert check_identifier(tiny.tokenizer, "sks") == "sks"


def test_identifier_that_splits_is_refused(tiny):
    with pytest.raises(Exception, match=r"'xqzzy' splits into 5 tokens"):
        check_identifier(tiny.tokenizer, "xqzzy")
    with pytest.raises(Exception, match="identifier is empty"):
        check_identifier(tiny.tokenizer, " ")


def test_tiny_tokenizer_is_the_same_on_every_machine():
    # The vocab feeds the tiny model's hash, and so every class-image cache key: pin it.
    from dreamfleet.core.hashing import sha256_json
    from dreamfleet.core.tokenizer import tiny_vocab_and_merges

    assert sha256_json(tiny_vocab_and_merges()) == "23250a931ad0118fe04322ad445d738588c5dbad1a856cc1cc9efb820744c251"
