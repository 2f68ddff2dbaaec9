"""The fleet beyond one node: a real multi-node Ray cluster on this machine (a head and two
worker nodes, each its own raylet with its own custom resource), the manifest, the registry and
Ray Train's checkpoints on a real S3 API (moto's server), and a worker node lost mid-run."""

from __future__ import annotations

import os
import threading
import time

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

    saved = dict(os.environ)
    caches = tmp_path_factory.mktemp("node-caches")
    os.environ.update({**s3_server.env(), "DREAMFLEET_S3_ATTEMPTS": "6", "RAY_TRAIN_V2_ENABLED": "1",
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
    c.caches = caches
    ray.init(address=c.address, namespace="dreamfleet", log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    c.nodes = nodes
    c.node_ids = {name: n.node_id for name, n in nodes.items()}
    yield c
    ray.shutdown()
    c.shutdown()
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
    Train's checkpoints on S3. node_b is removed while it trains a subject past a checkpoint: that
    subject is leased again and resumes on node_a from its last checkpoint on S3 (steps not
    doubled); everything finished is kept; the broken subject fails alone. With prior preservation
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
