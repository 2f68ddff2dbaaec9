"""The `dreamfleet` CLI: help, a real run, and user mistakes without stack traces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subject_folder

from dreamfleet.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreamfleet.cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_help_lists_commands():
    r = cli("--help")
    assert r.returncode == 0 and "train-subject" in r.stdout and "demo" in r.stdout
    r = cli("train-subject", "--help")
    assert r.returncode == 0 and "--class-noun" in r.stdout and "--method {lora,full}" in r.stdout


def test_train_subject_cli_writes_expert(tmp_path, capsys):
    folder = subject_folder(tmp_path, "teddy", n=3)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("steps: 3\nnum_class_images: 2\nclass_generation_steps: 2\nvalidation_inference_steps: 2\n")
    code = main([
        "train-subject", "--images", str(folder), "--class-noun", "stuffed animal", "--out", str(tmp_path / "expert"),
        "--class-cache", str(tmp_path / "cache"), "--config", str(recipe), "--steps", "4", "--identifier", "sks",
    ])
    assert code == 0
    info = json.loads((tmp_path / "expert" / "expert.json").read_text())
    assert info["subject_id"] == "teddy" and info["instance_prompt"] == "a sks stuffed animal"
    assert info["config"]["steps"] == 4 and info["config"]["num_class_images"] == 2
    assert "expert written to" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("empty", [], "no images found"),
        ("bad", [], "not a readable image"),
        ("ok", ["--class-noun", ""], "class noun is empty"),
        ("ok", ["--identifier", "xqzzy"], "splits into"),
        ("ok", ["--steps", "0"], "'steps' must be at least 1"),
        ("ok", ["--method", "dora"], "invalid choice"),
    ],
)
def test_user_mistakes_exit_cleanly(tmp_path, setup, extra, message):
    folder = tmp_path / "subj"
    if setup == "empty":
        folder.mkdir()
    else:
        subject_folder(tmp_path, "subj", n=3)
        if setup == "bad":
            (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["train-subject", "--images", str(folder), "--out", str(tmp_path / "out"),
            "--class-cache", str(tmp_path / "cache"), "--steps", "1"]
    if "--class-noun" not in extra:
        args += ["--class-noun", "dog"]
    r = cli(*args, *extra)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_demo_runs_end_to_end(tmp_path):
    subject_folder(tmp_path, "pics", n=3)
    r = cli("demo", "--out", str(tmp_path / "demo"), "--images", str(tmp_path / "pics"), "--steps", "4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "demo" / "grid.png").is_file()
    assert (tmp_path / "demo" / "experts" / "pics" / "expert.json").is_file()
    assert "grid:" in r.stdout and "outputs in" in r.stdout
