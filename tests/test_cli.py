"""The `dreamfleet` CLI: help, a real run, and user mistakes without stack traces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import subject_folder

from dreamfleet.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamfleet.cli.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


def test_help_lists_commands():
    r = cli("--help")
    assert r.returncode == 0 and "train-subject" in r.stdout and "demo" in r.stdout
    r = cli("train-subject", "--help")
    assert r.returncode == 0 and "--class-noun" in r.stdout and "--method {lora,full,profusion}" in r.stdout


def test_help_imports_no_torch(capsys):
    """`dreamfleet --help` stays instant: no sub-command imports torch to build its flags (they
    come when that sub-command is parsed), and those flags are still there."""
    code = ("import sys\nfrom dreamfleet.cli.main import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("no torch"), r.stdout[-500:] + r.stderr[-2000:]
    for command, flag in ((["eval"], "--images-per-prompt"), (["apprentice", "train"], "--min-demos"),
                          (["profusion", "pretrain"], "--feature-channels"), (["toy", "pretrain"], "--vae-steps")):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert flag in capsys.readouterr().out, command


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
def test_user_mistakes_exit_cleanly(tmp_path, setup, extra, message, capsys):
    """Each mistake exits 2 with one message on stderr, no stack trace, and writes nothing. In
    this process (``main``) for all but one: a ``python -m dreamfleet.cli.main`` process per case
    cost 8-30 s on 2 cores; the "bad" case runs as that process, for the exit status itself."""
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
    if setup == "bad":
        r = cli(*args, *extra)
        code, err = r.returncode, r.stderr
    else:
        try:
            code = main([*args, *extra])
        except SystemExit as e:  # argparse's own refusals (an unknown --method)
            code = e.code
        err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_keys_need_a_registry_that_is_there(tmp_path, capsys):
    """A mistyped --registry is refused, naming the path, instead of creating a keys file there."""
    from dreamfleet.registry import Registry

    typo = tmp_path / "regsitry"
    for args in (["create", "--admin"], ["list"]):
        assert main(["keys", *args, "--registry", str(typo)]) == 2
        err = capsys.readouterr().err
        assert f"no registry at {typo}" in err and "--keys FILE" in err, err
    assert not typo.exists()
    Registry(tmp_path / "reg")
    assert main(["keys", "create", "--admin", "--registry", str(tmp_path / "reg")]) == 0
    assert (tmp_path / "reg" / "serving" / "keys.json").is_file()
    assert main(["keys", "create", "--admin", "--registry", str(typo), "--keys", str(tmp_path / "keys.json")]) == 0
    assert (tmp_path / "keys.json").is_file() and not typo.exists()


def test_a_key_with_a_rate_of_its_own(tmp_path, capsys):
    """`keys create --rate-per-min`: the key's requests fill a bucket of their own at that rate."""
    from dreamfleet.registry import Registry
    from dreamfleet.serving.auth import KeyStore
    from dreamfleet.serving.limits import TenantRateLimit

    reg = str(tmp_path / "reg")
    Registry(reg)
    assert main(["keys", "create", "--tenant", "acme", "--rate-per-min", "30", "--registry", reg]) == 0
    token = capsys.readouterr().out.splitlines()[0]
    assert main(["keys", "list", "--registry", reg]) == 0 and "rate=30/min" in capsys.readouterr().out
    assert main(["keys", "create", "--tenant", "acme", "--rate-per-min", "0", "--registry", reg]) == 2
    assert "--rate-per-min must be positive and finite" in capsys.readouterr().err
    caller = KeyStore(tmp_path / "reg" / "serving" / "keys.json").authenticate(token)
    assert caller.tenant == "acme" and caller.rate_per_min == 30
    now = [0.0]
    limiter = TenantRateLimit(600, 2, clock=lambda: now[0])  # the server's: 10 a second, 2 at once
    assert limiter.admit("key:a", 30) is None and limiter.admit("key:a", 30) is None
    assert limiter.admit("key:a", 30) == pytest.approx(2.0)  # 30 a minute: the next one in 2 s
    assert limiter.admit("acme") is None  # the tenant's own bucket is untouched
    now[0] = 2.0
    assert limiter.admit("key:a", 30) is None


def test_bad_manifest_override_is_refused_before_ray_starts(tmp_path):
    """A per-subject learning_rate of -1 in the manifest: `dreamfleet train` refuses the run at
    submit time, naming the subject and the field; no Ray session, no registry entry."""
    src = tmp_path / "src"
    for i, name in enumerate(["good", "bad"]):
        subject_folder(src, name, n=3, seed=i)
    (src / "classes.csv").write_text("subject_id,class_noun,learning_rate\ngood,dog,\nbad,dog,-1\n")
    assert main(["manifest", "build", "--from-folders", str(src), "--out", str(tmp_path / "man"), "--min-side", "32"]) == 0
    # the refusal in a process of its own, with Ray's temp folder for this command (RAY_TMPDIR):
    # another test process may start Ray meanwhile
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt"))
    r = cli("train", str(tmp_path / "man"), "--out", str(tmp_path / "reg"), "--steps", "2",
            env={"RAY_TMPDIR": str(ray_tmp)})
    assert r.returncode == 2, r.stderr
    assert "subject 'bad'" in r.stderr and "learning_rate" in r.stderr and "-1" in r.stderr, r.stderr
    assert "'good'" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "reg" / "runs").exists() and not list((tmp_path / "reg").glob("subjects/*"))
    assert not list(ray_tmp.glob("ray/session_*")), "a Ray session was started"
    shutil.rmtree(ray_tmp)


def test_demo_runs_end_to_end(tmp_path):
    # `make demo` with one toy subject, 4 steps, 4 class images and 1 image of 5 denoising steps per
    # evaluation prompt: the fan-out, the evaluation, results.md and the grid
    r = cli("demo", "--out", str(tmp_path / "demo"), "--subjects", "ball-halves", "--steps", "4",
            "--class-images", "4", "--eval-images", "1", "--eval-steps", "5", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    # trained through the fan-out: the expert is published to the demo's registry
    assert (out / "registry" / "subjects" / "ball-halves" / "versions" / "v0001" / "expert.json").is_file()
    # its metrics stored with the expert, where the dashboard's subject page shows them
    stored = json.loads((out / "registry" / "subjects" / "ball-halves" / "versions" / "v0001" / "eval.json").read_text())
    assert "subject_fidelity" in stored and "subject_fidelity (base model)" in stored, stored
    assert (stored["images_per_prompt"], stored["num_inference_steps"]) == (1, 5)  # how it was scored
    results = (out / "results.md").read_text()
    assert "| ball-halves | DreamBooth | ball |" in results and "| ball-halves | base | ball |" in results
    assert "prompt_fidelity_novel" in results and "1 image(s) per prompt" in results and "5 denoising steps" in results
    assert "prior preservation with\n4 class images" in results
    from PIL import Image

    assert Image.open(out / "grid.png").size[0] > 10 * 96  # 5 photos + 5 contexts at 96 px
    assert "grid:" in r.stdout and "results:" in r.stdout and "outputs in" in r.stdout
    # progress lines from the fan-out (not a terminal here), none of Ray Data's own progress logs
    said = r.stdout + r.stderr
    assert "progress: 1/1 subjects finished (1 done, 0 failed)" in said, said[-3000:]
    assert "Starting execution of Dataset" not in said and "Running Dataset" not in said, said[-3000:]


def test_demo_takes_your_photos(tmp_path):
    import argparse

    from dreamfleet.cli.demo import _write_manifest
    from dreamfleet.data.manifest import Manifest

    folder = subject_folder(tmp_path, "pics", n=3)
    args = argparse.Namespace(images=folder, class_noun="teddy bear", subjects="ball-halves")
    assert _write_manifest(args, tmp_path / "manifest") == ["pics"]
    rec = Manifest.open(tmp_path / "manifest").record("pics")
    assert rec.class_noun == "teddy bear" and rec.num_images == 3 and "on the beach" in rec.eval_prompts[3]


def test_serve_refuses_a_port_another_server_listens_on(tmp_path):
    """Ray's proxy listens with SO_REUSEPORT: a second `dreamfleet serve` on its port used to start
    and split the traffic with the first."""
    import socket
    import subprocess
    import sys

    from dreamfleet.registry import Registry

    Registry(tmp_path / "reg")
    with socket.socket() as first:
        first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        first.bind(("127.0.0.1", 0))
        first.listen()
        port = first.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "dreamfleet.cli.main", "serve", "--registry", str(tmp_path / "reg"),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and f"port {port} on 127.0.0.1 is in use" in r.stderr, r.stderr[-2000:]
