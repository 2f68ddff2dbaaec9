"""The registry and manifests on a real S3 API (moto's server): conditional version allocation,
a forward-only ``latest``, one ranged read per subject, and clear errors for bad S3 locations."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from test_registry import fake_expert

from dreamfleet.core.errors import DataError, DreamfleetError
from dreamfleet.data.manifest import BuildConfig, Manifest, build_from_folders
from dreamfleet.registry import Registry


def test_registry_on_s3_publishes_versions_and_latest(s3, tmp_path):
    uri = f"s3://{s3.bucket()}/fleet/registry"
    reg = Registry(uri)
    v1 = reg.publish("dog", fake_expert(tmp_path, "dog", "a"))
    v2 = reg.publish("dog", fake_expert(tmp_path, "dog", "b"))
    assert (v1, v2) == ("v0001", "v0002") and reg.latest("dog") == "v0002"
    again = Registry(uri, create=False)
    assert again.expert_info("dog").input_hash == "b" and again.expert_info("dog", "v0001").input_hash == "a"
    reg.publish("dog", fake_expert(tmp_path, "dog", "c"), set_latest=False)
    assert reg.latest("dog") == "v0002" and reg.versions("dog") == ["v0001", "v0002", "v0003"]
    assert not (reg.fetch("dog", "v0003") / ".claim").exists()
    assert reg.delete("dog", "v0002") == ["v0002"] and reg.latest("dog") == "v0003"
    reg.update_state("dog", state="done", version="v0003")
    assert reg.states()["dog"].state == "done"


def test_small_registry_objects_are_one_request_each_on_s3(s3, tmp_path):
    """Small registry objects go in one PUT (not a multipart upload's three requests) and come
    back in one GET (no HEAD first), an absent one included: a fleet writes them all the time.
    An expert's files are one PUT each too."""
    reg = Registry(f"s3://{s3.bucket()}/reg")
    s3.record()
    reg.update_state("dog", state="queued")  # GET (absent) + PUT
    assert reg.get_state("dog").state == "queued" and reg.latest("dog") is None  # GET + GET (absent)
    assert [r["method"] for r in s3.requests()] == ["GET", "PUT", "GET", "GET"]
    expert = fake_expert(tmp_path, "dog", "a")
    s3.record()
    assert reg.publish("dog", expert) == "v0001"
    puts = [r["url"].split("?")[0].rsplit("/", 1)[1] for r in s3.requests() if r["method"] in ("PUT", "POST")]
    # the claim, the two files (expert.json last), latest: no multipart upload anywhere
    assert puts == [".claim", "pytorch_lora_weights.safetensors", "expert.json", "latest"], puts


def test_a_claimed_but_unfinished_version_is_never_reused_or_read(s3, tmp_path):
    reg = Registry(f"s3://{s3.bucket()}/reg")
    reg.publish("dog", fake_expert(tmp_path, "dog", "a"))
    # a publisher that died after claiming v0002 and uploading part of it
    reg.fs.open_output_stream(reg.subject_path("dog", "versions", "v0002", ".claim")).close()
    with reg.fs.open_output_stream(reg.subject_path("dog", "versions", "v0002", "w.safetensors")) as f:
        f.write(b"partial")
    assert reg.versions("dog") == ["v0001"] and reg.latest("dog") == "v0001"
    assert reg.publish("dog", fake_expert(tmp_path, "dog", "b")) == "v0003"


def _publisher(uri: str, src: str, tag: str, n: int, env: dict) -> None:
    import os

    os.environ.update(env)
    reg = Registry(uri)
    for i in range(n):
        reg.update_state("dog", state="training", run_id=tag)
        reg.publish("dog", Path(src) / f"dog-{tag}{i}")


def test_concurrent_publishers_on_s3_lose_nothing_and_latest_stays_complete(s3, tmp_path):
    """Two publisher processes against one S3 registry while a reader polls ``latest``: every
    version number is used once, every expert is there, and ``latest`` always names a complete
    version and never moves back."""
    uri = f"s3://{s3.bucket()}/reg"
    Registry(uri)
    n = 5
    for tag in "xy":
        for i in range(n):
            fake_expert(tmp_path / "src", "dog", f"{tag}{i}")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_publisher, args=(uri, str(tmp_path / "src"), tag, n, s3.env())) for tag in "xy"]
    for p in procs:
        p.start()
    reader, seen = Registry(uri, create=False), []
    while any(p.is_alive() for p in procs):
        latest = reader.latest("dog")
        if latest:
            assert latest in reader.versions("dog"), f"latest names {latest}, which is not complete"
            seen.append(int(latest[1:]))
        time.sleep(0.05)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    versions = reader.versions("dog")
    assert versions == [f"v{i:04d}" for i in range(1, 2 * n + 1)]
    assert sorted(reader.expert_info("dog", v).input_hash for v in versions) == sorted(
        f"{t}{i}" for t in "xy" for i in range(n))
    assert seen == sorted(seen), "latest moved back"
    assert reader.latest("dog") == versions[-1]


def test_manifest_on_s3_reads_one_subject_with_one_ranged_get(s3, tmp_path):
    from test_manifest import _subjects

    _subjects(tmp_path / "src", {f"s{i:02d}": 3 for i in range(12)})
    build_from_folders(tmp_path / "src", None, tmp_path / "m", BuildConfig(shard_size_mb=0.1))
    local = Manifest.open(tmp_path / "m")
    bucket = s3.bucket()
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}/x")
    pafs.copy_files(str(tmp_path / "m"), f"{bucket}/manifests/m", destination_filesystem=fs)
    remote = Manifest.open(f"s3://{bucket}/manifests/m")
    rec = remote.record("s05")
    assert rec == local.record("s05")
    s3.record()
    got = remote.read_images("s05")
    shard_gets = [r for r in s3.requests() if r["method"] == "GET" and rec.shards[0] in r["url"]]
    assert len(shard_gets) == 1 and "Range" in shard_gets[0]["headers"], shard_gets
    assert remote.bytes_read == rec.num_bytes
    assert [k for k, _, _ in got] == [k for k, _, _ in local.read_images("s05")]


@pytest.mark.parametrize("problem", ["missing bucket", "wrong credentials", "unreachable endpoint"])
def test_bad_s3_locations_are_named_before_anything_runs(s3, tmp_path, monkeypatch, problem):
    uri = f"s3://{s3.bucket()}/reg"
    if problem == "missing bucket":
        uri = "s3://no-such-bucket-here/reg"
        match = "bucket 'no-such-bucket-here' does not exist"
    elif problem == "wrong credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setattr("dreamfleet.core.storage._client", _refusing_client)
        match = "credentials were refused"
    else:
        from helpers import free_port

        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        match = "cannot reach the S3 endpoint"
    with pytest.raises(DreamfleetError, match=match) as err:
        Registry(uri)
    assert uri in str(err.value)
    with pytest.raises(DataError, match=match):
        Manifest.open(uri.replace("/reg", "/manifest"))


def _refusing_client(*args):
    """moto accepts any key; a server that checks keys answers 403 InvalidAccessKeyId."""
    import botocore.exceptions as bx

    class Refusing:
        def head_bucket(self, Bucket):
            raise bx.ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "The AWS Access Key Id "
                                            "you provided does not exist in our records."},
                                  "ResponseMetadata": {"HTTPStatusCode": 403}}, "HeadBucket")

    return Refusing()


def test_cli_train_with_a_bad_s3_registry_exits_cleanly(s3, tmp_path, capsys):
    from test_manifest import _subjects

    from dreamfleet.cli.main import main

    _subjects(tmp_path / "src", {"dog1": 3})
    build_from_folders(tmp_path / "src", None, tmp_path / "m", BuildConfig())
    code = main(["train", str(tmp_path / "m"), "--out", "s3://no-such-bucket-here/reg"])
    err = capsys.readouterr().err
    assert code != 0 and "s3://no-such-bucket-here/reg" in err and "does not exist" in err, err
    assert "Traceback" not in err


def test_registry_writes_wait_out_an_s3_outage(s3, tmp_path, monkeypatch):
    """The endpoint goes away for 8 s (every connection cut, the port closed, as a restarting
    server does) in the middle of state writes and a publish: they retry with backoff and
    complete once it is back; nothing is lost or half-written."""
    import threading

    from s3 import Outage

    outage = Outage(s3.port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.endpoint)
    monkeypatch.setenv("DREAMFLEET_S3_ATTEMPTS", "12")
    reg = Registry(f"s3://{s3.bucket()}/reg")
    expert = fake_expert(tmp_path, "dog", "a")
    done: dict = {}

    def work():
        for step in range(20):
            reg.update_state("dog", state="training", step=step)
            time.sleep(0.2)
        done["version"] = reg.publish("dog", expert)
        reg.update_state("dog", state="done", version=done["version"])

    t = threading.Thread(target=work)
    t.start()
    time.sleep(1.0)
    outage.down()
    time.sleep(8.0)
    outage.up()
    t.join(180)
    assert not t.is_alive() and done["version"] == "v0001"
    st = reg.get_state("dog")
    assert (st.state, st.step, st.version) == ("done", 19, "v0001")
    assert reg.expert_info("dog").input_hash == "a" and reg.latest("dog") == "v0001"
    outage.down()


def test_class_images_generated_on_one_node_are_pulled_by_another(s3, tmp_path, monkeypatch):
    """Two nodes' caches (different local disks) over one S3 prefix: the first generates and
    pushes, the second pulls the same bytes and generates nothing; asking for more later
    generates only the missing ones."""
    from helpers import fast_config

    from dreamfleet.core.models import load_base
    from dreamfleet.trainers.class_images import ClassImageCache, ClassImageRequest

    base = load_base("tiny-random")
    req = ClassImageRequest.for_config(fast_config(num_class_images=3), "a dog")
    mirror = f"s3://{s3.bucket()}/reg/class-images"
    monkeypatch.setenv("DREAMFLEET_CACHE", str(tmp_path / "node_a"))
    first = ClassImageCache(mirror).ensure(base, req)
    monkeypatch.setenv("DREAMFLEET_CACHE", str(tmp_path / "node_b"))
    second = ClassImageCache(mirror).ensure(base, req)
    assert (first.generated, second.generated) == (3, 0)
    assert first.folder != second.folder and second.folder.is_relative_to(tmp_path / "node_b")
    assert [p.read_bytes() for p in first.paths] == [p.read_bytes() for p in second.paths]
    more = ClassImageRequest.for_config(fast_config(num_class_images=5), "a dog")
    assert ClassImageCache(mirror).ensure(base, more).generated == 2
    assert ClassImageCache(mirror).available(base, more) == set(range(5))
