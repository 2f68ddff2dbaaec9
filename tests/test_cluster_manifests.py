"""Every YAML under cluster/ is checked against what would run it: KubeRay objects against the
operator's own CRD schemas (../shared/kuberay-crds, strict like `kubectl apply --validate=strict`:
an unknown field is an error), the `ray up` config against Ray's cluster-launcher schema, and the
commands and Serve applications inside them against dreamfleet's own parsers."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import REPO, SHARED

CRDS = SHARED / "kuberay-crds"
YAMLS = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayService": "ray.io_rayservices.yaml"}


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused wherever Kubernetes would prune them."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema(kind: str, version: str) -> dict:
    path = CRDS / KUBERAY_KINDS[kind]
    if not path.is_file():
        pytest.skip(f"{path} not found: the KubeRay CRDs live in ../shared beside the checkout")
    crd = yaml.safe_load(path.read_text())
    served = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in served, f"{kind} has no served version {version}; the CRD serves {sorted(served)}"
    return strict(served[version]["schema"]["openAPIV3Schema"])


def kuberay_docs():
    for path in YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in KUBERAY_KINDS:
                yield pytest.param(path, doc, id=f"{path.name}:{doc['kind']}")


def test_every_cluster_yaml_is_checked():
    names = {p.name for p in YAMLS}
    assert {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml", "ray-up.yaml"} <= names
    kinds = {d.values[1]["kind"] for d in kuberay_docs()}
    assert kinds == set(KUBERAY_KINDS)


@pytest.mark.parametrize(("path", "doc"), list(kuberay_docs()))
def test_kuberay_object_matches_the_operator_crd(path, doc):
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    errors = sorted(jsonschema.Draft7Validator(crd_schema(doc["kind"], version)).iter_errors(doc), key=str)
    assert not errors, f"{path.name}: " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5])


def test_a_typo_is_caught():
    doc = yaml.safe_load((REPO / "cluster" / "raycluster.yaml").read_text())
    doc["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    messages = [e.message for e in jsonschema.Draft7Validator(crd_schema("RayCluster", "v1")).iter_errors(doc)]
    assert any("maxReplica" in m for m in messages) and any("is not of type 'string'" in m for m in messages)


def _workers(spec: dict) -> list[dict]:
    return spec["workerGroupSpecs"]


def test_fleet_shape_gpu_autoscaling_s3_secret_and_head_without_training():
    for path in YAMLS:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in KUBERAY_KINDS:
                continue
            spec = {"RayCluster": lambda s: s, "RayJob": lambda s: s["rayClusterSpec"],
                    "RayService": lambda s: s["rayClusterConfig"]}[doc["kind"]](doc["spec"])
            assert spec["enableInTreeAutoscaling"] is True, path.name
            for group in _workers(spec):
                assert group["minReplicas"] < group["maxReplicas"], f"{path.name}: {group['groupName']} cannot scale"
                (container,) = group["template"]["spec"]["containers"]
                assert "nvidia.com/gpu" in container["resources"]["limits"], path.name
            pods = [spec["headGroupSpec"], *_workers(spec)]
            for pod in pods:
                (container,) = pod["template"]["spec"]["containers"]
                assert {"secretRef": {"name": "dreamfleet-s3"}} in container.get("envFrom", []), path.name


def test_rayjob_entrypoint_is_a_valid_dreamfleet_command():
    from dreamfleet.cli.main import build_parser

    doc = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "dreamfleet"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "train" and args.out.startswith("s3://")


def test_rayservice_applications_build_serve_configs(tmp_path, monkeypatch):
    """The serveConfigV2 import paths resolve and their args make a valid ServeConfig (the
    registry is pointed at a local one here, since S3 is not what this test is about)."""
    import importlib

    from dreamfleet.cli import serve as serve_cli
    from dreamfleet.registry import Registry

    doc = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert serve_cfg["http_options"]["port"] == 8000
    Registry(tmp_path / "reg")
    keys = tmp_path / "keys.json"
    from dreamfleet.cli.main import main

    assert main(["keys", "create", "--registry", str(tmp_path / "reg"), "--keys", str(keys), "--tenant", "acme"]) == 0
    for app in serve_cfg["applications"]:
        module, attr = app["import_path"].split(":")
        builder = getattr(importlib.import_module(module), attr)
        assert callable(builder)
        args = {**app["args"], "registry": str(tmp_path / "reg"), "keys": str(keys)}
        args.pop("address", None)
        cfg = serve_cli.serve_config(args)
        assert cfg.host == "0.0.0.0" and cfg.registry == str((tmp_path / "reg").resolve())
    with pytest.raises(Exception, match="replicaz"):
        serve_cli.serve_config({"registry": str(tmp_path / "reg"), "replicaz": 2})


def test_rayservice_head_sets_the_serve_proxy_timeouts_dreamfleet_serve_sets():
    from dreamfleet.serving.app import PROXY_TIMEOUTS

    doc = yaml.safe_load((REPO / "cluster" / "rayservice.yaml").read_text())
    head = doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in head["env"]}.items() >= PROXY_TIMEOUTS.items()


def test_ray_up_config_matches_the_cluster_launcher_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "ray-up.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
