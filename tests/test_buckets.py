"""Aspect-ratio bucketing: each photo at its nearest bucket, a batch from one bucket, nothing padded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import fast_config, picture

from dreamfleet.core.errors import ConfigError
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import (
    DreamBoothObjective,
    SubjectData,
    aspect_buckets,
    nearest_bucket,
    prepare_subject,
)
from dreamfleet.trainers.fit import train_packed, train_subject

# 3:2 landscape, 2:3 portrait and square photos
SIZES = [(96, 64), (96, 64), (90, 60), (64, 96), (60, 90), (70, 70)]


def subject() -> SubjectData:
    return SubjectData("wide", "dog", [picture(600 + i, size=s) for i, s in enumerate(SIZES)])


def config(**kw):
    return fast_config(**{"aspect_buckets": True, "bucket_step": 16, "resolution": 64, "batch_size": 2, **kw})


def test_buckets_follow_the_rule():
    buckets = aspect_buckets(512, 64, 2.0)
    assert (512, 512) in buckets and (640, 384) in buckets and (384, 640) in buckets
    for w, h in buckets:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2.0
    assert nearest_bucket((1500, 1000), buckets) == (640, 384)  # 1.5: log-distance 0.105 to 1.67, 0.154 to 1.29
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)


def test_each_photo_is_at_its_buckets_size_with_nothing_padded():
    from PIL import Image

    p = prepare_subject(subject(), "tiny-random", config(with_prior_preservation=False))
    assert [b.hw for b in p.instance] == [(80, 48), (64, 64), (48, 80)]  # (height, width): portrait, square, landscape
    assert [b.ids.tolist() for b in p.instance] == [[3, 4], [5], [0, 1, 2]]
    # a landscape photo: resized to cover 80x48 and center-cropped; no fill anywhere
    photo = subject().images[0]
    scale = max(80 / 96, 48 / 64)
    ref = photo.resize((round(96 * scale), round(64 * scale)), Image.BILINEAR)
    left, top = (ref.width - 80) // 2, (ref.height - 48) // 2
    ref = np.asarray(ref.crop((left, top, left + 80, top + 48)), dtype=np.float32) / 127.5 - 1
    assert torch.equal(p.instance[2].bchw[0], torch.from_numpy(ref).permute(2, 0, 1))


def test_a_batch_is_one_buckets_and_class_images_follow_it(tmp_path):
    cfg = config(num_class_images=3)
    p = prepare_subject(subject(), "tiny-random", cfg, class_cache=ClassImageCache(tmp_path / "c"))
    assert [k.hw for k in p.klass] == [b.hw for b in p.instance]  # the class images cropped to every bucket
    o = DreamBoothObjective.from_prepared(p)
    f = 2 ** (len(p.base.vae.config.block_out_channels) - 1)  # the VAE's downscale
    seen = set()
    for step in range(40):
        b = o.batch(step, 0)
        h, w = b.noisy.noisy.shape[-2:]
        assert (h * f, w * f) in {(80, 48), (64, 64), (48, 80)} and b.size == 4  # 2 photos + 2 class images
        seen.add((h * f, w * f))
    assert len(seen) == 3
    assert math.isfinite(o.loss(0, 0)[0].item())


def test_a_bucketed_subject_trains_and_publishes(tmp_path):
    r = train_subject(subject(), "tiny-random", config(steps=4, num_class_images=2), tmp_path / "e",
                      class_cache=ClassImageCache(tmp_path / "c"), progress=False)
    assert r.loop.final_step == 4 and r.info.config["aspect_buckets"] and all(
        math.isfinite(h["loss"]) for h in r.loop.history)


def test_sdxl_is_told_the_buckets_size():
    p = prepare_subject(subject(), "tiny-sdxl", config(with_prior_preservation=False))
    o = DreamBoothObjective.from_prepared(p)
    f = 2 ** (len(p.base.vae.config.block_out_channels) - 1)
    for step in range(10):
        b = o.batch(step, 0)
        h, w = b.noisy.noisy.shape[-2:]
        assert b.cond["time_ids"][:, 4:].tolist() == [[h * f, w * f]] * 2  # target size = the bucket (h, w)


def test_buckets_are_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match="bucket_step 64 is too coarse for resolution 64"):
        prepare_subject(subject(), "tiny-random", config(bucket_step=64, with_prior_preservation=False))
    with pytest.raises(ConfigError, match="multiple of 8"):
        config(bucket_step=12)
    with pytest.raises(ConfigError, match="--pack 1"):
        train_packed([subject(), subject()], "tiny-random", [config(seed=s) for s in (0, 1)],
                     [tmp_path / "a", tmp_path / "b"], progress=False)
