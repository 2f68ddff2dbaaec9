"""DINO / CLIP-I / CLIP-T plumbing and maths, with tiny random models of the real classes."""

from __future__ import annotations

import pytest
import torch
from helpers import picture
from PIL import Image

from dreamfleet.core.errors import ModelError
from dreamfleet.eval.metrics import (
    ClipScorer,
    DinoScorer,
    clip_i_score,
    clip_t_score,
    dino_score,
    mean_pairwise_cosine,
)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dino")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=37)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from dreamfleet.core.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    tok = build_tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# Tolerances in this file: scores are float32 cosines of unit vectors (|value| <= 1), computed
# here by hand and there by the scorer in another summation order: a few ulp apart (1.2e-7
# each). abs=1e-5 (~80 ulp) is far above that and far below any gap between two real scores.


def test_mean_pairwise_cosine_averages_every_pair():
    gen = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    real = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]]), dim=-1)
    # pairs: (1, .7071, 0) and (0, .7071, -1) -> mean of six values
    expected = (1 + 2**-0.5 + 0 + 0 + 2**-0.5 - 1) / 6
    assert mean_pairwise_cosine(gen, real) == pytest.approx(expected, abs=1e-6)


def test_dino_identical_images_score_one_and_pairs_are_averaged(dino_dir):
    scorer = DinoScorer(dino_dir)
    a, b = picture(1, (48, 40)), picture(2, (48, 40))
    assert dino_score(scorer, [a], [a]) == pytest.approx(1.0, abs=1e-5)
    assert dino_score(scorer, [a, a], [a, a, a]) == pytest.approx(1.0, abs=1e-5)
    emb = scorer.embed([a, b])
    manual = float(emb[0] @ emb[1])
    assert manual < 0.9999
    # generated [a], real [a, b]: the mean of cos(a, a)=1 and cos(a, b)
    assert dino_score(scorer, [a], [a, b]) == pytest.approx((1 + manual) / 2, abs=1e-5)
    assert dino_score(scorer, [a, b], [a, b]) == pytest.approx((2 + 2 * manual) / 4, abs=1e-5)


def test_clip_i_and_clip_t(clip_dir):
    scorer = ClipScorer(clip_dir)
    a, b = picture(3), picture(4)
    assert clip_i_score(scorer, [a], [a]) == pytest.approx(1.0, abs=1e-5)
    ia, ib = scorer.embed_images([a, b])
    assert clip_i_score(scorer, [a, b], [b]) == pytest.approx((float(ia @ ib) + 1) / 2, abs=1e-5)
    prompts = ["a red ball on the beach", "a blue box"]
    t = scorer.embed_texts(prompts)
    expected = (float(ia @ t[0]) + float(ib @ t[1])) / 2
    assert clip_t_score(scorer, [a, b], prompts) == pytest.approx(expected, abs=1e-5)
    # a text embedding is the same whatever batch it is computed in (padding is masked)
    assert torch.allclose(scorer.embed_texts([prompts[1]])[0], t[1], atol=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        clip_t_score(scorer, [a, b], prompts[:1])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match=r"config\.json"):
        DinoScorer(tmp_path)


def test_images_of_any_size_and_mode_are_accepted(dino_dir):
    scorer = DinoScorer(dino_dir)
    emb = scorer.embed([Image.new("L", (20, 50), 128), picture(5, (100, 30), mode="RGBA")])
    assert emb.shape == (2, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
