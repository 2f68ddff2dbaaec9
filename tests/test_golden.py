"""Golden fixed-seed values of the trainer and the serving engine, pinned before a restructuring.

As diffusers' ``expected_slice`` tests: a refactor that should not change results must keep
these. The values were recorded on 2026-12-02 (2-core AMD EPYC, torch 2.13.0+cpu, the lock).

Tolerances. Another CPU sums in another order, so the loss curves are compared within
``NOISE_MARGIN`` times the spread of the same run between 1 and 2 torch threads on the
machine the test runs on (helpers.py); images are 8-bit, so a rounding-level difference of
the weights can move a pixel by at most one level.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_within_noise, curve_gap, curve_spread, fast_config, picture, torch_threads

from dreamfleet.registry import Registry
from dreamfleet.serving.engine import ExpertEngine, GenItem
from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject

STEPS = 10
GOLDEN_LOSSES = {
    "lora": [2.1409082412719727, 2.345557689666748, 2.029520034790039, 1.9986423254013062, 1.9840105772018433,
             2.0596580505371094, 2.0486464500427246, 1.9820435047149658, 1.9775335788726807, 1.9360668659210205],
    "full": [2.1409082412719727, 2.2210144996643066, 1.6963348388671875, 1.7843574285507202, 1.6663923263549805,
             1.657984972000122, 1.8368165493011475, 1.5819242000579834, 1.2733345031738281, 1.1785330772399902],
}
# pixels [0:3, 0:3, 0] of a 32 px image, 2 denoising steps, seed 0, through ExpertEngine
GOLDEN_SLICES = {
    "lora": [[114, 118, 125], [141, 149, 149], [137, 162, 142]],
    "full": [[112, 114, 120], [138, 138, 136], [132, 149, 134]],
}


def subject() -> SubjectData:
    return SubjectData("golden", "dog", [picture(70 + i) for i in range(3)])


def train(root, method: str, threads: int = 1):
    cfg = fast_config(steps=STEPS, method=method, learning_rate=5e-2 if method == "lora" else 5e-3, seed=0)
    with torch_threads(threads):
        return train_subject(subject(), "tiny-random", cfg, root / f"{method}-t{threads}",
                             class_cache=ClassImageCache(root / "cache"), progress=False)


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    return {(m, n): train(root, m, n) for m in ("lora", "full") for n in (1, 2)}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_curve_is_golden(experts, method):
    one, two = ([h["loss"] for h in experts[(method, n)].loop.history] for n in (1, 2))
    assert len(one) == STEPS
    gap = {"loss": curve_gap(GOLDEN_LOSSES[method], one)}
    assert_within_noise(gap, {"loss": curve_spread(one, two)}, f"{method} losses {one} against the golden curve")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_served_image_is_golden(experts, method, tmp_path):
    reg = Registry(tmp_path / "reg")
    r = experts[(method, 1)]
    reg.publish("golden", r.expert_dir)
    engine = ExpertEngine(str(tmp_path / "reg"), device="cpu")
    item = GenItem(r.info.instance_prompt, 1, steps=2, guidance_scale=7.5, seed=0, width=32, height=32)
    (image,) = engine.generate("golden", reg.latest("golden"), [item])[0]
    pixels = np.asarray(image, dtype=np.int16)[0:3, 0:3, 0]
    assert np.abs(pixels - np.asarray(GOLDEN_SLICES[method])).max() <= 1, pixels.tolist()
