"""Masked loss: a subject mask per photo, from the folder or the manifest to the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fast_config, picture
from PIL import Image

from dreamfleet.core.errors import DataError
from dreamfleet.core.images import list_image_files, load_subject_images
from dreamfleet.data.manifest import Manifest, build_from_folders
from dreamfleet.trainers.dreambooth import DreamBoothObjective, SubjectData, prepare_subject


def left_half_mask(size: tuple[int, int]) -> Image.Image:
    """Black (no loss) on the left half, white (the subject) on the right."""
    w, h = size
    arr = np.zeros((h, w), np.uint8)
    arr[:, w // 2:] = 255
    return Image.fromarray(arr)


def objective(masks, **kw) -> DreamBoothObjective:
    photos = [picture(500 + j, size=(64, 64)) for j in range(3)]
    s = SubjectData("masked", "dog", photos, masks=masks(photos) if masks else None)
    cfg = fast_config(**{"with_prior_preservation": False, "batch_size": 3, "masked_loss": masks is not None, **kw})
    return DreamBoothObjective.from_prepared(prepare_subject(s, "tiny-random", cfg))


def test_a_masked_pixel_has_zero_loss_weight():
    o = objective(lambda photos: [left_half_mask(p.size) for p in photos])
    b = o.batch(0, 0)
    pred = torch.zeros_like(b.noisy.target, requires_grad=True)
    o.loss_terms(pred, b)["loss"].backward()
    mask = torch.nn.functional.interpolate(b.mask, size=pred.shape[-2:], mode="area").expand_as(pred)
    w = pred.shape[-1]
    assert (mask[..., : w // 2 - 1] == 0).all()  # the left half is masked out at the latents' size too
    assert pred.grad[mask == 0].abs().max() == 0  # the background teaches nothing
    assert (pred.grad[mask > 0] != 0).float().mean() > 0.99


def test_an_all_white_mask_is_the_plain_loss():
    white = objective(lambda photos: [Image.new("L", p.size, 255) for p in photos])
    plain = objective(None)
    b, c = white.batch(3, 0), plain.batch(3, 0)
    assert b.mask is not None and c.mask is None
    pred = torch.randn(b.noisy.target.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(white.loss_terms(pred, b)["loss"], plain.loss_terms(pred, c)["loss"], rtol=1e-6)


def test_masks_follow_the_photo_through_crop_and_flip():
    """A photo cropped at random and flipped keeps its mask aligned: the mask marks the same pixels."""
    red = np.zeros((48, 80, 3), np.uint8)
    red[:, :, 2] = 255
    red[:, :20] = (255, 0, 0)
    photos = [Image.fromarray(red)]
    mask = Image.fromarray(np.where(np.all(red == (255, 0, 0), -1), 255, 0).astype(np.uint8))
    from dreamfleet.trainers.dreambooth import to_pixels

    for seed in range(6):
        px = to_pixels(photos, 32, center_crop=False, flip=True, g=torch.Generator().manual_seed(seed), masks=[mask])
        is_red = (px.bchw[0, 0] > 0.9) & (px.bchw[0, 1] < -0.9)
        marked = px.masks[0, 0] > 0.5
        assert (is_red == marked).float().mean() > 0.95


def test_masked_loss_without_masks_is_refused_naming_the_subject():
    with pytest.raises(DataError, match=r"subject 'masked'.*none of its photos has a mask.*NN.mask.png"):
        objective(lambda photos: [None] * len(photos))


def photo_folder(root, n: int, seed: int, masks: dict[int, tuple[int, int]], size=(96, 64),
                 classes: str = "subject_id,class_noun\ndog1,dog\n"):
    """root/dog1/NN.png (n photos of ``size``), NN.mask.png of the given sizes, root/classes.csv."""
    (root / "dog1").mkdir(parents=True, exist_ok=True)
    for j in range(n):
        picture(seed + j, size=size).save(root / "dog1" / f"{j:02d}.png")
    for j, mask_size in masks.items():
        left_half_mask(mask_size).save(root / "dog1" / f"{j:02d}.mask.png")
    (root / "classes.csv").write_text(classes)
    return root


def test_masks_beside_the_photos_reach_the_manifest_and_the_folder_loader(tmp_path):
    # 01's mask is a scaled copy: it is fitted to the photo
    root = photo_folder(tmp_path / "src", 3, 520, {0: (96, 64), 1: (48, 32)})
    assert [p.name for p in list_image_files(root / "dog1")] == ["00.png", "01.png", "02.png"]

    build_from_folders(root, None, tmp_path / "m")
    samples = Manifest.open(tmp_path / "m").read_images("dog1")
    masks = [meta.get("mask") for _, _, meta in samples]
    assert masks[2] is None and masks[0].size == masks[1].size == (96, 64)
    assert np.array_equal(np.asarray(masks[0]), np.asarray(left_half_mask((96, 64))))
    assert np.asarray(masks[1])[:, :40].max() == 0 and np.asarray(masks[1])[:, 56:].min() == 255
    assert Manifest.open(tmp_path / "m").validate() == []

    loaded = load_subject_images(root / "dog1")
    assert [im.mask is not None for im in loaded] == [True, True, False]


def test_a_mask_of_another_shape_skips_its_photo_and_names_both(tmp_path):
    root = photo_folder(tmp_path / "src", 4, 530, {1: (64, 64)})
    report = build_from_folders(root, None, tmp_path / "m")
    text = "\n".join(p.message for p in report.problems)
    assert "01.mask.png: the mask is 64x64 px and its photo 96x64 px" in text and "photo is skipped" in text
    assert Manifest.open(tmp_path / "m").record("dog1").num_images == 3


def test_the_fan_out_worker_prepares_a_subject_with_its_masks_and_prompts(tmp_path):
    """What a fan-out worker builds from a leased subject: the manifest's masks (masked_loss)
    and its evaluation prompts (best-step selection's)."""
    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.runtime import GroupConfig, _prepare_leased

    root = photo_folder(tmp_path / "src", 3, 540, {j: (64, 64) for j in range(3)}, size=(64, 64),
                        classes="subject_id,class_noun,eval_prompts\ndog1,dog,a {0} {1}|a {0} {1} at night\n")
    build_from_folders(root, None, tmp_path / "m")
    m = Manifest.open(tmp_path / "m")
    base = load_base("tiny-random")
    cfg = fast_config(with_prior_preservation=False, masked_loss=True).resolve(native_resolution=base.resolution)
    gc = GroupConfig("run", 0, "q", "ns", str(tmp_path / "m"), str(tmp_path / "r"), "tiny-random", {"dog1": cfg},
                     tracker=lambda *a: None)
    p = _prepare_leased(gc, m, "dog1", base)
    assert p.instance.masks is not None and p.instance.masks[:, :, :, : p.cfg.resolution // 2 - 1].max() == 0
    assert p.subject.prompts == ["a {0} {1}", "a {0} {1} at night"]
