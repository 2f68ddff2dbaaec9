"""The memory features of the large families on a CUDA device (not run on the CPU machines).

    .venv/bin/python -m pytest -m gpu tests/test_gpu_families.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fast_config, picture

from dreamfleet.trainers.class_images import ClassImageCache
from dreamfleet.trainers.dreambooth import SubjectData
from dreamfleet.trainers.fit import train_subject

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def subject() -> SubjectData:
    return SubjectData("dog0", "dog", [picture(j, size=(64, 48)) for j in range(3)])


def cuda_config(**kw):
    return fast_config(**{"steps": 6, "learning_rate": 1e-2, "device": "cuda", "mixed_precision": "bf16", **kw})


@pytest.mark.parametrize("spec", ["tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-zimage"])
def test_each_family_trains_in_bf16_on_cuda(spec, tmp_path):
    r = train_subject(subject(), spec, cuda_config(gradient_checkpointing=True), tmp_path / "e",
                      class_cache=ClassImageCache(tmp_path / "cache"), progress=False)
    assert all(np.isfinite(h["loss"]) for h in r.loop.history)
    assert r.info.train_stats["precision"] == "bfloat16"


def test_text_encoders_leave_the_gpu_before_the_first_step(tmp_path):
    """free_text_encoders: T5 and CLIP are on the CPU while the transformer trains; validation
    renders (which need them) still work."""
    from dreamfleet.core.models import load_base

    base = load_base("tiny-flux")
    where: list[set[str]] = []

    def on_step(step, metrics):
        where.append({str(next(m.parameters()).device) for m in base.text_encoders.values()})

    train_subject(subject(), base, cuda_config(validation_every=3), tmp_path / "e",
                  class_cache=ClassImageCache(tmp_path / "cache"), progress=False, on_step=on_step)
    assert where and all(w == {"cpu"} for w in where)
    assert (tmp_path / "e" / "validation" / "step-00000003.png").is_file()


def test_nf4_base_and_8bit_adamw_use_less_gpu_memory(tmp_path):
    """QLoRA: the frozen Flux transformer in NF4 and 8-bit AdamW moments; the peak allocated
    memory of a tiny run is below the bf16 run's, and the loss stays finite."""
    peaks = {}
    for name, kw in {"plain": {}, "nf4": {"quantize_base": "nf4", "optimizer": "adamw8bit"}}.items():
        torch.cuda.reset_peak_memory_stats()
        r = train_subject(subject(), "tiny-flux", cuda_config(**kw), tmp_path / name,
                          class_cache=ClassImageCache(tmp_path / "cache"), progress=False)
        peaks[name] = torch.cuda.max_memory_allocated()
        assert all(np.isfinite(h["loss"]) for h in r.loop.history)
    assert peaks["nf4"] < peaks["plain"], peaks
