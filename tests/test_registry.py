"""The expert registry: states, versions, atomic publishing, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from dreamfleet.core.errors import DataError, DreamfleetError
from dreamfleet.registry import Registry, SubjectState


def fake_expert(root: Path, subject: str, tag: str) -> Path:
    """An expert-shaped folder (the registry copies files; it does not read weights)."""
    d = root / f"{subject}-{tag}"
    d.mkdir(parents=True)
    (d / "pytorch_lora_weights.safetensors").write_bytes(tag.encode() * 1000)
    info = {
        "subject_id": subject, "class_noun": "dog", "identifier": "sks", "instance_prompt": "a sks dog",
        "method": "lora", "base_model": {"spec": "tiny-random"}, "config": {}, "code_version": {},
        "input_hash": tag, "num_images": 3, "final_loss": 0.1, "wall_time_s": 1.0, "created_at": "now",
        "weights": ["pytorch_lora_weights.safetensors"],
    }
    (d / "expert.json").write_text(json.dumps(info))
    return d


def test_publish_versions_and_latest(tmp_path):
    reg = Registry(tmp_path / "reg")
    assert reg.subjects() == [] and reg.latest("dog") is None
    v1 = reg.publish("dog", fake_expert(tmp_path, "dog", "a"))
    v2 = reg.publish("dog", fake_expert(tmp_path, "dog", "b"))
    assert (v1, v2) == ("v0001", "v0002") and reg.latest("dog") == "v0002"
    assert reg.expert_info("dog").input_hash == "b" and reg.expert_info("dog", "v0001").input_hash == "a"
    # a failed retrain never moves latest: publishing without set_latest keeps v0002
    reg.publish("dog", fake_expert(tmp_path, "dog", "c"), set_latest=False)
    assert reg.latest("dog") == "v0002" and reg.versions("dog") == ["v0001", "v0002", "v0003"]
    assert reg.delete("dog", "v0002") == ["v0002"] and reg.latest("dog") == "v0003"
    with pytest.raises(DataError, match="has no version 'v0009'"):
        reg.expert_info("dog", "v0009")
    reg.delete("dog")
    assert reg.subjects() == []


def test_half_written_version_is_invisible(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.publish("dog", fake_expert(tmp_path, "dog", "a"))
    # a crashed upload: files present but no expert.json yet
    half = Path(reg.subject_path("dog", "versions", "v0002"))
    half.mkdir()
    (half / "pytorch_lora_weights.safetensors").write_bytes(b"partial")
    assert reg.versions("dog") == ["v0001"] and reg.latest("dog") == "v0001"
    assert reg.publish("dog", fake_expert(tmp_path, "dog", "b")) == "v0003"  # never reuses the name


def test_states_round_trip(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.set_state(SubjectState("cat", state="training", step=3, total_steps=10, loss=0.5))
    reg.update_state("cat", state="failed", error="subject 'cat': bad data", attempts=2)
    st = reg.get_state("cat")
    assert (st.state, st.step, st.attempts, st.error) == ("failed", 3, 2, "subject 'cat': bad data")
    assert set(reg.states()) == {"cat"}
    with pytest.raises(ValueError, match="unknown subject state"):
        reg.update_state("cat", state="exploded")


def test_unsafe_subject_ids_are_refused(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(DataError, match="path separator"):
        reg.get_state("../etc")


def test_refuses_non_registry_and_future_registry(tmp_path):
    with pytest.raises(DreamfleetError, match="no registry here"):
        Registry(tmp_path / "none", create=False)
    Registry(tmp_path / "reg")
    (tmp_path / "reg" / "registry.json").write_text(json.dumps({"format": "dreamfleet-registry", "version": 99}))
    with pytest.raises(DreamfleetError, match="newer than this dreamfleet reads"):
        Registry(tmp_path / "reg")


def test_file_uri_works(tmp_path):
    reg = Registry(f"file://{tmp_path / 'reg'}")
    reg.publish("dog", fake_expert(tmp_path, "dog", "a"))
    assert Registry(tmp_path / "reg").latest("dog") == "v0001"


def _writer(root: str, src: str, tag: str, n: int) -> None:
    reg = Registry(root)
    for i in range(n):
        for subject in ("dog", "cat", "owl"):
            reg.update_state(subject, state="training", step=i, run_id=tag)
            reg.publish(subject, Path(src) / f"{subject}-{tag}{i}")
            reg.update_state(subject, state="done", run_id=tag)


def test_two_concurrent_writers_do_not_corrupt(tmp_path):
    root = str(tmp_path / "reg")
    Registry(root)
    n = 6
    for tag in ("x", "y"):
        for i in range(n):
            for subject in ("dog", "cat", "owl"):
                fake_expert(tmp_path / "src", subject, f"{tag}{i}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, str(tmp_path / "src"), tag, n)) for tag in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reg = Registry(root)
    for subject in ("dog", "cat", "owl"):
        versions = reg.versions(subject)
        assert versions == [f"v{i:04d}" for i in range(1, 2 * n + 1)]  # unique, gap-free
        hashes = sorted(reg.expert_info(subject, v).input_hash for v in versions)
        assert hashes == sorted(f"{t}{i}" for t in "xy" for i in range(n))  # nothing lost or overwritten
        assert reg.latest(subject) in versions
        assert reg.get_state(subject).state == "done"
    assert not list(Path(root).rglob("*.tmp*"))
