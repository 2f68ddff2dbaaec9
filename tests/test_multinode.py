"""The fleet beyond one node: a real multi-node Ray cluster on this machine (a head and two
worker nodes, each its own raylet with its own custom resource), the manifest, the registry and
Ray Train's checkpoints on a real S3 API (moto's server), and a worker node lost mid-run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import restore_local_ray
from helpers import fast_config, manifest_with_a_broken_subject, wait_healthy

from dreamfleet.control.orchestrator import FanoutConfig, run_fanout
from dreamfleet.registry import Registry

FLEET: dict[str, str] = {}  # what the fan-out test trained, for the serving test after it


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Head (no CPUs: it schedules, it does not train) + node_a + node_b, one CPU each, with
    the S3 environment every raylet passes on to its workers, and a local cache of its own per
    node (``DREAMFLEET_CACHE``), as nodes that share no disk have."""
    import ray
    from ray.cluster_utils import Cluster
    from s3 import Outage

    saved = dict(os.environ)
    caches = tmp_path_factory.mktemp("node-caches")
    outage = Outage(s3_server.port)  # every node reaches S3 through it, so a test can take S3 away
    # 10 attempts: backoff waits of 50 ms doubling, ~25 s in all, outlast the 6 s outage below
    os.environ.update({**outage.env(s3_server), "DREAMFLEET_S3_ATTEMPTS": "10", "RAY_TRAIN_V2_ENABLED": "1",
                       "DREAMFLEET_CACHE": str(caches / "head")})
    ray.shutdown()  # the session's single-node Ray, if a test before started it
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1},
                                                      "include_dashboard": False})
    nodes = {}
    for name in ("node_a", "node_b"):
        os.environ["DREAMFLEET_CACHE"] = str(caches / name)  # inherited by the node's raylet and workers
        nodes[name] = c.add_node(num_cpus=1, resources={name: 1})
    os.environ["DREAMFLEET_CACHE"] = str(caches / "head")
    c.wait_for_nodes()
    c.caches, c.s3_outage = caches, outage
    ray.init(address=c.address, namespace="dreamfleet", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    c.nodes = nodes
    c.node_ids = {name: n.node_id for name, n in nodes.items()}
    yield c
    ray.shutdown()
    c.shutdown()
    outage.down()
    os.environ.clear()
    os.environ.update(saved)
    restore_local_ray()


@pytest.fixture(scope="module")
def s3_manifest(cluster, s3_server, tmp_path_factory) -> str:
    local = manifest_with_a_broken_subject(tmp_path_factory.mktemp("mn"))
    bucket = s3_server.bucket("fleet")
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}/x")
    pafs.copy_files(local, f"{bucket}/manifests/m", destination_filesystem=fs)
    return f"s3://{bucket}/manifests/m"


def _wait_for_checkpoint_on(reg: Registry, node_id: str, subjects: list[str], step: int) -> str | None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for sid in subjects:
            st = reg.get_state(sid)
            if st and st.state == "training" and st.worker.get("ray_node") == node_id and (st.checkpoint_step or 0) >= step:
                return sid
        time.sleep(0.5)
    return None


@pytest.mark.parametrize("prior", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["", "class-images"])
def test_fanout_over_two_nodes_on_s3_survives_losing_a_node(cluster, s3_server, s3_manifest, prior):
    """Worker groups train on both nodes, reading the manifest and writing the registry and Ray
    Train's checkpoints on S3. node_b is removed while it trains a subject past a checkpoint, and
    then S3 goes away for 6 s (port closed, connections cut, as a restarting server) while node_a
    trains: that subject is leased again and resumes on node_a from its last checkpoint on S3
    (steps not doubled), the writes during the outage retry until it is back, everything finished
    is kept, and the broken subject fails alone. With prior preservation
    (the slow variant: Ray Data adds ~70 s here; the cache's S3 mirror is also tested in
    test_s3.py) the class images are generated once, by a Ray Data actor on one node, put on S3
    beside the registry, and every worker on either node pulls them instead of generating its own."""
    reg_uri = f"s3://{s3_server.bucket('reg')}/fleet"
    steps, good = 120, ["cat1", "dog1", "dog2"]
    train = fast_config(steps=steps, checkpoint_every=20, with_prior_preservation=prior)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(s=run_fanout(
        s3_manifest, reg_uri, "tiny-random", train, FanoutConfig(max_concurrent=2, max_retries=2),
        progress=False)), daemon=True)
    t.start()
    reg = Registry(reg_uri)
    FLEET["registry"] = reg_uri
    victim = _wait_for_checkpoint_on(reg, cluster.node_ids["node_b"], good, 20)
    assert victim, "no subject reached a checkpoint on node_b"
    finished_before = {sid: reg.latest(sid) for sid in good if reg.latest(sid)}
    cluster.remove_node(cluster.nodes["node_b"], allow_graceful=False)
    cluster.s3_outage.down()  # and S3 restarts while node_a trains: 6 s with no endpoint at all
    time.sleep(6)
    cluster.s3_outage.up()
    assert t.is_alive(), "the run ended before the S3 outage was over: it was not mid-run"
    t.join(600)
    os.environ["DREAMFLEET_CACHE"] = str(cluster.caches / "node_b2")
    cluster.nodes["node_b"] = cluster.add_node(num_cpus=1, resources={"node_b": 1})  # for the tests after
    os.environ["DREAMFLEET_CACHE"] = str(cluster.caches / "head")
    cluster.node_ids["node_b"] = cluster.nodes["node_b"].node_id
    summary = result["s"]
    assert sorted(summary.done) == good and list(summary.failed) == ["broken"], summary
    assert "hash" in summary.failed["broken"]
    node_a = cluster.node_ids["node_a"]
    assert all(reg.get_state(sid).worker["ray_node"] == node_a for sid in good if sid not in finished_before)
    info = reg.expert_info(victim)
    assert info.train_stats["attempt"] >= 2 and info.train_stats["resumed_from"] >= 20
    assert info.train_stats["steps_executed"] < 2 * steps - 20  # resumed from S3, not retrained
    for sid, version in finished_before.items():  # nothing finished was lost or retrained
        assert reg.versions(sid) == [version]
    for sid in good:
        assert reg.latest(sid) == "v0001" and reg.expert_info(sid).subject_id == sid
    if prior:
        assert summary.class_images_generated == 8  # 4 dog + 4 cat, once for the fleet
        assert all(reg.expert_info(sid).class_images["generated"] == 0 for sid in good)  # pulled, not regenerated
        mirrored = reg.fs.get_file_info(pafs.FileSelector(reg._p("class-images"), recursive=True))
        assert sum(i.base_name.endswith(".png") for i in mirrored) == 8
    fs, root = reg.fs, reg._p("checkpoints")  # Ray Train persisted its checkpoints on S3
    assert fs.get_file_info(root).type == pafs.FileType.Directory


def test_apprentice_gather_renders_on_both_nodes_from_the_s3_registry(cluster, tmp_path):
    """`dreamfleet apprentice gather` over the experts the fan-out published to S3: one Ray Data
    actor per worker node (one CPU each), each reading experts and the subjects' photos (the S3
    manifest) from S3 and scoring with DINO (a tiny ViT here; dogs and cats are not toy-world
    classes); every render records the node that made it."""
    import pyarrow.parquet as pq
    import torch
    from transformers import ViTConfig, ViTModel

    from dreamfleet.control.gather import GatherConfig, gather

    if "registry" not in FLEET:
        pytest.skip("needs the fan-out test's registry (run the module)")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37), add_pooling_layer=False).save_pretrained(tmp_path / "dino")
    c = GatherConfig(templates=["a {0} {1}", "a {0} {1} on the beach"], images_per_prompt=1, threshold=-1.0,
                     num_inference_steps=2, concurrency=2, cpus_per_actor=1, scorer="dino",
                     dino_model=str(tmp_path / "dino"))
    report = gather(FLEET["registry"], tmp_path / "set", c)
    rows = pq.read_table(tmp_path / "set" / "triples.parquet").to_pylist()
    assert not report.failed and report.experts == 3 and len(rows) == report.generated == 3 * 2
    assert {r["subject_id"] for r in rows} == {"dog1", "cat1", "dog2"}
    assert {r["ray_node"] for r in rows} == set(cluster.node_ids.values()), rows


@pytest.mark.slow  # ~150 s: two drivers' Ray Train runs on the two one-CPU nodes, one driver run twice
def test_two_drivers_on_one_s3_registry_and_a_killed_driver_rerun(cluster, s3_server, s3_manifest, tmp_path):
    """Two orchestrators at once on one S3 registry, overlapping on cat1: driver A (its own
    process, `dreamfleet train --address`) and driver B (this process). A is killed with SIGKILL
    once its first subject is published, before it finishes its second, and the same command is
    run again: what A finished is skipped, the rest is trained (cat1 by both drivers, as two
    versions, or once if B finished it before the rerun looked), and no version is lost or
    written twice."""
    import json
    import re
    import signal
    import subprocess
    import sys
    from dataclasses import asdict

    reg_uri = f"s3://{s3_server.bucket('two')}/fleet"
    flags = ["--steps", "60", "--checkpoint-every", "20", "--no-with-prior-preservation", "--validation-every", "0",
             "--max-retries", "1", "--address", cluster.address]
    cmd_a = [str(Path(sys.executable).with_name("dreamfleet")), "train", s3_manifest, "--out", reg_uri,
             "--subjects", "dog1,cat1", *flags]
    log_a = tmp_path / "a.log"
    proc = subprocess.Popen(cmd_a, stdout=log_a.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(b=run_fanout(
        s3_manifest, reg_uri, "tiny-random", fast_config(steps=60, checkpoint_every=20, with_prior_preservation=False),
        FanoutConfig(max_retries=1), subjects=["cat1", "dog2"], progress=False)), daemon=True)
    t.start()
    reg = Registry(reg_uri)
    deadline = time.monotonic() + 400  # A trains dog1, then cat1 (one group, in the order given)
    while time.monotonic() < deadline and proc.poll() is None and not (
            getattr(reg.get_state("dog1"), "state", "") == "done" and reg.latest("dog1")):
        time.sleep(0.3)
    assert proc.poll() is None and reg.latest("dog1"), f"driver A: {log_a.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    at_kill = {sid: reg.versions(sid) for sid in ("dog1", "cat1")}
    rerun = subprocess.run(cmd_a, capture_output=True, text=True, timeout=600)
    said = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, said[-4000:]
    t.join(600)
    b = result["b"]
    assert sorted(b.done) == ["cat1", "dog2"] and not b.failed, b
    # dog1 is skipped (and cat1 too if B had finished it by then)
    assert re.search(r"skipping \d finished subject\(s\): [^\n]*\bdog1\b", said), said[-4000:]
    assert reg.versions("dog1") == at_kill["dog1"] == ["v0001"]  # not trained again by the rerun
    assert reg.versions("dog2") == ["v0001"]
    for sid in ("dog1", "cat1", "dog2"):
        versions = reg.versions(sid)
        assert versions[:len(at_kill.get(sid, []))] == at_kill.get(sid, [])  # nothing published was lost
        infos = [json.dumps(asdict(reg.expert_info(sid, v)), sort_keys=True, default=str) for v in versions]
        assert len(set(infos)) == len(infos), sid  # each version is one training's complete expert, written once
        assert reg.latest(sid) == versions[-1] and reg.get_state(sid).state == "done"


@pytest.mark.slow  # ~105 s (Serve's proxies and replicas on three nodes); test_serving.py serves in `make test`
def test_serving_and_dashboard_read_the_s3_registry_with_replicas_on_both_nodes(cluster):
    """`dreamfleet serve` on the cluster: two model replicas (one CPU each) land on the two worker
    nodes, generate with the experts the fan-out published to S3, and the dashboard lists them."""
    import httpx
    import ray
    from helpers import free_port
    from ray import serve

    from dreamfleet.cli.serve import start
    from dreamfleet.serving.config import ServeConfig

    if "registry" not in FLEET:
        pytest.skip("needs the fan-out test's registry (run the module)")
    cfg = ServeConfig(registry=FLEET["registry"], port=free_port(), replicas=2, cpus_per_replica=1,
                      registry_ttl_s=0.5)
    url = start(cfg)
    try:
        wait_healthy(url, 180)
        for sid in ("dog1", "cat1", "dog2"):
            r = httpx.post(f"{url}/v1/generate", json={"subject": sid, "prompt": "a [V] on the beach", "steps": 2,
                                                        "seed": 1, "width": 64, "height": 64}, timeout=180)
            assert r.status_code == 200 and r.json()["images"], r.text
        replicas = [a for a in ray._private.state.actors().values()
                    if a["State"] == "ALIVE" and "ExpertModel" in a.get("ActorClassName", "")]
        assert {a["Address"]["NodeID"] for a in replicas} == set(cluster.node_ids.values()), replicas
        listed = httpx.get(f"{url}/dashboard/api/subjects", timeout=30).json()
        assert {s["subject"] for s in listed["subjects"]} >= {"dog1", "cat1", "dog2", "broken"}
    finally:
        serve.shutdown()
