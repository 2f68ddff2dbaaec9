"""Cluster submission: a real `ray start --head` on 127.0.0.1 and the Ray Job Submission API."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import free_port, subject_folder

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def dreamfleet(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dreamfleet.cli.main", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def job_api(address: str, path: str) -> httpx.Response:
    """GET from the Ray Job REST API with the local auth token (Ray 2.60 has token auth on by
    default; `ray start` writes the token to ~/.ray/auth_token)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and token_file.is_file():
        token = token_file.read_text().strip()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(address + path, headers=headers, timeout=10)


@pytest.fixture
def ray_head(tmp_path):
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
           "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=true",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 (outlives this block, closed at teardown)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the Job API answers once the head's dashboard is up
            try:
                if job_api(address, "/api/version").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"the Ray head's Job API at {address} did not come up in 120 s; see {tmp_path / 'head.log'}")
        yield address
    finally:
        # The whole head (its own process session) at once, also when it never came up: `ray
        # start --block` on SIGTERM waits 30 s and more for its children, and nothing of this
        # throwaway cluster needs keeping.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()

def wait_for_job(address: str, job_id: str, timeout: float = 300) -> dict:
    """The job's details once it has ended, polled through the Job REST API (a `dreamfleet
    status` process per poll would take a CPU from the job on a 2-core machine)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = job_api(address, f"/api/jobs/{job_id}").json()
        if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return job
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def test_submit_runs_on_a_real_head_and_reports(ray_head, tmp_path):
    """`dreamfleet submit` to a real head: the job trains and publishes its subject, closes its
    run, and `dreamfleet status` reports it (the driver-kill resume below is the long version)."""
    from dreamfleet.registry import Registry

    subject_folder(tmp_path / "src", "dog1", n=3)
    (tmp_path / "src" / "classes.csv").write_text("subject_id,class_noun\ndog1,dog\n")
    r = dreamfleet("manifest", "build", "--from-folders", str(tmp_path / "src"), "--out", str(tmp_path / "man"),
                   "--min-side", "32")
    assert r.returncode == 0, r.stderr
    r = dreamfleet("submit", str(tmp_path / "man"), "--address", ray_head, "--out", str(tmp_path / "reg"),
                   "--python", sys.executable, "--steps", "4", "--no-with-prior-preservation",
                   "--validation-inference-steps", "2", "--num-validation-images", "1")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    assert job_id.startswith("dreamfleet-")
    state = wait_for_job(ray_head, job_id)["status"]
    status = dreamfleet("status", job_id, "--address", ray_head)
    assert state == "SUCCEEDED" and "SUCCEEDED" in status.stdout, (state, status.stdout + status.stderr)
    assert "1 done" in status.stdout
    reg = Registry(tmp_path / "reg")
    assert reg.run(job_id)["state"] == "finished" and reg.versions("dog1") == ["v0001"]
    assert reg.expert_info("dog1").train_stats["steps_executed"] == 4


@pytest.mark.slow  # ~5 min on 2 cores: two drivers, each starting its worker groups
def test_submit_driver_killed_then_resubmitted_resumes(ray_head, tmp_path):
    """`dreamfleet submit` to a real head; the job's driver dies (SIGKILL) mid-subject and
    takes its worker groups with it; the same submission again resumes each subject from its
    last checkpoint instead of step 0, and the run finishes."""
    from dreamfleet.registry import Registry

    src = tmp_path / "src"
    for i, name in enumerate(["dog1", "cat1"]):
        subject_folder(src, name, n=3, seed=i)
    (src / "classes.csv").write_text("subject_id,class_noun\ndog1,dog\ncat1,cat\n")
    r = dreamfleet("manifest", "build", "--from-folders", str(src), "--out", str(tmp_path / "man"), "--min-side", "32")
    assert r.returncode == 0, r.stderr
    steps = 100  # long enough to kill the driver between a checkpoint and the end (a step is ~0.1-0.2 s here)
    submit = ["submit", str(tmp_path / "man"), "--address", ray_head, "--out", str(tmp_path / "reg"),
              "--python", sys.executable, "--steps", str(steps), "--checkpoint-every", "10",
              "--num-class-images", "2", "--class-generation-steps", "2", "--validation-inference-steps", "2",
              "--num-validation-images", "1", "--learning-rate", "1e-3"]
    r = dreamfleet(*submit)
    assert r.returncode == 0, r.stderr
    first = r.stdout.strip().splitlines()[-1]
    assert first.startswith("dreamfleet-")
    reg = Registry(tmp_path / "reg")
    killed_at: dict[str, int] = {}
    deadline = time.time() + 300
    while time.time() < deadline and not killed_at:
        job = job_api(ray_head, f"/api/jobs/{first}").json()
        assert job["status"] in ("PENDING", "RUNNING"), job
        states = {sid: reg.get_state(sid) for sid in ("dog1", "cat1")}
        if any(st and st.state == "training" and (st.checkpoint_step or 0) >= 20 and st.step < steps - 40
               for st in states.values()):
            killed_at = {sid: st.checkpoint_step or 0 for sid, st in states.items() if st}
            os.kill(int(job["driver_info"]["pid"]), signal.SIGKILL)
        time.sleep(0.2)
    assert killed_at, "never saw a checkpoint of a running subject"
    assert wait_for_job(ray_head, first, 60)["status"] == "FAILED"
    assert reg.latest("dog1") is None or reg.latest("cat1") is None  # killed mid-run
    assert reg.run(first)["state"] == "running"  # the dead driver never closed its run

    r = dreamfleet(*submit)
    assert r.returncode == 0, r.stderr
    second = r.stdout.strip().splitlines()[-1]
    state = wait_for_job(ray_head, second)["status"]
    status = dreamfleet("status", second, "--address", ray_head)
    assert state == "SUCCEEDED" and "SUCCEEDED" in status.stdout, (state, status.stdout + status.stderr)
    assert "2 done" in status.stdout
    assert reg.run(second)["state"] == "finished"
    for sid, at in killed_at.items():
        assert reg.versions(sid) == ["v0001"]
        stats = reg.expert_info(sid).train_stats
        if at:  # resumed from its checkpoint, not retrained from step 0
            assert stats["resumed_from"] >= at, (sid, stats)
            assert stats["steps_executed"] < 2 * steps - at, (sid, stats)


def test_cluster_yamls_parse_and_name_the_entrypoint():
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in (REPO / "cluster").glob("*.yaml")}
    assert {"raycluster.yaml", "rayjob.yaml", "ray-up.yaml"} <= set(docs)
    cluster = docs["raycluster.yaml"][0]
    assert cluster["kind"] == "RayCluster"
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(
        c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]
    )
    job = docs["rayjob.yaml"][0]
    assert job["kind"] == "RayJob" and "dreamfleet train" in job["spec"]["entrypoint"]
    assert "s3://" in job["spec"]["entrypoint"]
    up = docs["ray-up.yaml"][0]
    assert up["cluster_name"] and "dreamfleet" in " ".join(up.get("setup_commands", []))


class _HeadStartingUp:
    """The Job API of a head whose dashboard agent has not registered yet (the error Ray's SDK
    raises, seen on a fresh head in CI), for ``refusals`` submissions; then it takes the job."""

    def __init__(self, refusals: int, error: str = "No available agent to submit job, please try again later."):
        self.refusals, self.error, self.calls = refusals, error, []

    def submit_job(self, **job):
        self.calls.append(job)
        if len(self.calls) <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.error}.")
        return job["submission_id"]


def test_submit_waits_for_a_head_whose_job_agent_is_not_up_yet(monkeypatch, capsys):
    from dreamfleet.cli.fleet import submit_when_agent_is_up
    from dreamfleet.core.errors import DreamfleetError

    monkeypatch.setattr(time, "sleep", lambda s: None)
    head = _HeadStartingUp(refusals=2)
    assert submit_when_agent_is_up(head, 60, entrypoint="x", submission_id="j1") == "j1"
    assert [c["submission_id"] for c in head.calls] == ["j1"] * 3  # the same id each time
    assert "job agent is not up yet" in capsys.readouterr().err
    with pytest.raises(DreamfleetError, match=r"no job agent ready after 0 s.*--agent-wait"):
        submit_when_agent_is_up(_HeadStartingUp(refusals=1), 0, entrypoint="x", submission_id="j2")
    with pytest.raises(RuntimeError, match="Unauthorized"):  # any other refusal is not retried
        submit_when_agent_is_up(_HeadStartingUp(refusals=1, error="Unauthorized"), 60, entrypoint="x", submission_id="j3")
