"""The trainer-vs-diffusers benchmark runs end to end on tiny-random, so it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "trainer_vs_diffusers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("trainer_vs_diffusers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_ab_comparison_writes_results(bench, tmp_path):
    out = tmp_path / "tvd.json"
    result = bench.main(["--model", "tiny", "--methods", "lora", "--steps", "2", "--warmup", "1",
                         "--repeats", "1", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    cmp = saved["comparisons"]["lora"]
    assert cmp == json.loads(json.dumps(result["comparisons"]["lora"]))
    for variant in ("dreamfleet", "reference"):
        assert cmp[variant]["steps_per_s"]["median"] > 0
        assert cmp[variant]["rss_peak_mb"]["median"] > 0
        losses = cmp[variant]["losses_first_run"]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert cmp["speedup"] > 0


def test_reference_step_gives_a_noise_mse_and_gradients(bench, tmp_path):
    """Same subject, same model: both variants' first losses are the same kind of number
    (an MSE of unit-variance noise, about 1), so the reference trains the same problem."""
    p = bench.prepared_subject(bench.Spec(method="full", steps=1, warmup=0, device="cpu"), tmp_path)
    ref = bench.ReferenceDreamBooth(p)
    loss = ref.step()
    assert 0.2 < loss < 5.0
    assert all(q.grad is not None for q in ref.params if q.requires_grad)


def test_flop_count_on_cpu(bench, tmp_path):
    row = bench.flops_per_step(bench.Spec(method="lora", steps=1, warmup=0, device="cpu", threads=1))
    assert row["flops_per_step"] > 0 and row["achieved_flop_s"] > 0
    assert "mfu" not in row  # no GPU: no peak rate to divide by


PACKING = BENCH.parent / "packing.py"


def test_packing_benchmark_writes_results(tmp_path):
    """Sequential solo runs against one packed run, 2 subjects, 2 timed steps: it runs, and the
    subjects' final losses agree between the two (the packed run trains the same subjects)."""
    spec = importlib.util.spec_from_file_location("packing_bench", PACKING)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "packing.json"
    result = module.main(["--model", "tiny", "--subjects", "2", "--steps", "2", "--warmup", "1",
                          "--repeats", "1", "--threads", "1", "--out", str(out)])
    cmp = json.loads(out.read_text())["comparisons"]["2"]
    assert cmp == json.loads(json.dumps(result["comparisons"]["2"]))
    for variant in ("sequential", "packed"):
        assert cmp[variant]["subjects_per_hour"]["median"] > 0
        assert cmp[variant]["rss_peak_mb"]["median"] > 0
        assert sorted(cmp[variant]["final_losses_first_run"]) == ["bench_dog0", "bench_dog1"]
    # A smoke bound (the packed-vs-solo bound derived from float noise is test_packing.py's):
    # after 2 steps the two agree to float noise (~1e-7 relative), while a wrong subject or
    # seed moves a final loss by 1e-2 and more.
    assert cmp["speedup"] > 0 and cmp["final_loss_max_rel_diff"] < 1e-4
