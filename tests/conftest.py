"""Shared fixtures: tiny models on CPU with fixed seeds, one local Ray per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DREAMBENCH = SHARED / "dreambench"
ARTIFACTS = REPO / "test-artifacts"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def pytest_configure(config):
    """One torch thread in the test process: numerics comparisons (packing vs solo, resume,
    caching) are exact only for a fixed reduction order, and CI has 2 cores shared with Ray."""
    import torch

    torch.set_num_threads(1)
    if not hasattr(config, "workerinput"):  # the main process, before any test process starts
        _ray_auth_token()


def _ray_auth_token() -> None:
    """Ray 2.60's first local cluster on a machine writes a new token to ~/.ray/auth_token. Two
    test processes starting Ray at once on a fresh machine would each write their own, and the
    first one's later clients would read the second's; so the token is made once, up front."""
    from ray._private.authentication.authentication_token_setup import (
        _get_default_token_path,
        generate_and_save_token,
    )

    if not os.environ.get("RAY_AUTH_TOKEN") and not _get_default_token_path().exists():
        generate_and_save_token()


# Seconds each module took (its tests' setup and call times, --durations).
# `make test` runs the suite on two processes (pytest-xdist, --dist loadscope: a module stays on
# one process with its fixtures); the longest modules go first so that neither process is left
# with a long module at the end while the other idles. Modules not listed run after these.
MODULE_SECONDS = {  # from a clean-clone run on 2026-12-07 (two processes, 2-core AMD EPYC)
    "test_serving": 418, "test_serving_load": 319, "test_multinode": 299, "test_fanout": 288,
    "test_toy_dreambooth": 210, "test_apprentice": 188, "test_cli": 180, "test_dashboard": 171,
    "test_jobs": 138, "test_profusion": 135, "test_bench_smoke": 87, "test_toy_flux": 53, "test_packing": 48,
    "test_dreambooth": 35, "test_families": 34, "test_s3": 33, "test_cluster_manifests": 32, "test_select": 14,
}


def pytest_collection_modifyitems(session, config, items):
    """Longest modules first (stable within a module); with `-n 2 --dist loadscope
    --no-loadscope-reorder` this is the order modules are handed to the two processes."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.stem, 0))


_LOCAL_RAY = {"wanted": False}


def init_local_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1",
                 namespace="dreamfleet",
                 # tests/ on the workers' path: a test's plugins (helpers' best-step scorers) load there too
                 runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": str(Path(__file__).parent)}})


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray instance for the whole test session (127.0.0.1, no dashboard).
    A module that needs another cluster (test_multinode.py) shuts it down and calls
    ``restore_local_ray()`` when it is done."""
    import ray

    init_local_ray()
    _LOCAL_RAY["wanted"] = True
    yield ray
    _LOCAL_RAY["wanted"] = False
    ray.shutdown()


def restore_local_ray() -> None:
    if _LOCAL_RAY["wanted"]:
        init_local_ray()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests keep files worth looking at afterwards (grids, screenshots)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def _dreambench_missing() -> str | None:
    if (DREAMBENCH / "prompts_and_classes.txt").is_file():
        return None
    return (f"DreamBench not found at {DREAMBENCH}: these tests read ../shared/dreambench beside the "
            "checkout (CI has it); clone the repository beside shared/ to run them")


@pytest.fixture(scope="session")
def dreambench() -> Path:
    """../shared/dreambench. CI (CI=true) always has it: there a missing copy fails the test
    instead of skipping it, so the DreamBench tests cannot silently stop running."""
    missing = _dreambench_missing()
    if missing and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{missing} (CI=true: CI must run them)")
    if missing:
        pytest.skip(missing)
    return DREAMBENCH


def pytest_report_header(config):
    """Say at the top of every run whether the DreamBench tests will run, and if not, why."""
    missing = _dreambench_missing()
    return f"dreambench: {DREAMBENCH}" if missing is None else f"dreambench: SKIPPED, {missing}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3 API (moto's standalone server, its own process) for the session."""
    from s3 import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The S3 server, with this test's environment pointing every client (pyarrow, boto3, Ray
    workers started from here) at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DREAMFLEET_S3_ATTEMPTS", "4")
    return s3_server
