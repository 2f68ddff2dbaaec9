"""Where dreamfleet reads and writes: local paths and object-store URIs (``s3://``, ``gs://``, ...).

One place opens every filesystem (manifests, the registry, Ray Train's checkpoint storage),
checks an object-store location before anything runs, and gives the two conditional writes
the registry needs on S3, where there is no rename and no lock file.

S3 endpoint, region and credentials come from the standard AWS environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile or an
instance role), which pyarrow, boto3 and Ray all read, so one URL names the same object on
every node. Every S3 request is retried with exponential backoff (``DREAMFLEET_S3_ATTEMPTS``,
default 12 attempts: waits of 50 ms doubling to 51 s, about 100 s in all), so a store that
restarts mid-run costs time, not the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dreamfleet.core.errors import DreamfleetError


def concurrently(fn: Callable[[Any], Any], items: list[Any], threads: int = 32) -> list[Any]:
    """``[fn(x) for x in items]`` on a thread pool, for one small request per item (a subject's
    state, its ``latest``): on an object store their latency, not their number, sets the time."""
    if len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def s3_attempts() -> int:
    return max(1, int(os.environ.get("DREAMFLEET_S3_ATTEMPTS", "12")))


def is_remote(uri: str) -> bool:
    """True for an object-store or other non-local URI (``file://`` is local)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    parsed = urlparse(str(uri))
    if parsed.scheme != "s3" or not parsed.netloc:
        raise DreamfleetError(f"{uri}: not an s3://bucket/path URL")
    return parsed.netloc, parsed.path.strip("/")


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client with the retry policy above (``from_uri`` gives 3 attempts). The AWS
    SDK's default strategy, not its "standard" one: that one stops retrying once a shared
    retry quota is spent, which a whole fleet waiting out one outage spends at once."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsDefaultS3RetryStrategy(max_attempts=s3_attempts()),
        "connect_timeout": 5.0, "request_timeout": 60.0,
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = urlparse(endpoint).scheme or "https"
    if _region():
        kwargs["region"] = _region()
    return pafs.S3FileSystem(**kwargs)


def open_fs(uri: str | os.PathLike[str], *, what: str = "location") -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or a URI."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as e:  # pyarrow.lib.ArrowInvalid is a ValueError
            raise DreamfleetError(f"{what} {uri!r}: cannot open its filesystem ({e})") from None
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def ray_storage(uri: str) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: S3 through the
    same retrying client as everything else (Ray wants the path without its scheme then)."""
    if is_s3(uri):
        fs, path = open_fs(uri)
        return path, fs
    return uri, None


# ---------------------------------------------------------------------------------- boto3 side


@lru_cache(maxsize=8)
def _client(attempts: int, connect_timeout: float, environment: tuple[str | None, ...]) -> Any:
    import boto3
    from botocore.config import Config

    cfg = Config(retries={"mode": "standard", "max_attempts": attempts}, connect_timeout=connect_timeout,
                 read_timeout=60, region_name=_region() or "us-east-1")
    return boto3.client("s3", config=cfg)


def s3_client(*, quick: bool = False) -> Any:
    """A boto3 S3 client (one per endpoint and key); ``quick`` for checks that should fail in
    seconds, not retry for minutes."""
    environment = tuple(os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                                       "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION"))
    return _client(2, 3.0, environment) if quick else _client(s3_attempts(), 5.0, environment)


def check_location(uri: str, *, what: str) -> None:
    """Fail fast, naming the URL, if an ``s3://`` location cannot be used (no bucket, bad
    credentials, unreachable endpoint). Local paths and other schemes pass through."""
    if not is_s3(str(uri)):
        return
    import botocore.exceptions as bx

    bucket, _ = split_s3(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    try:
        s3_client(quick=True).head_bucket(Bucket=bucket)
    except bx.NoCredentialsError:
        raise DreamfleetError(f"{what} {uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run with an instance role)") from None
    except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError) as e:
        raise DreamfleetError(f"{what} {uri}: cannot reach the S3 endpoint {endpoint} ({e}); check "
                              "AWS_ENDPOINT_URL and the network") from None
    except bx.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise DreamfleetError(f"{what} {uri}: bucket {bucket!r} does not exist at {endpoint}; create it "
                                  f"(aws s3 mb s3://{bucket}) or fix the URL") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise DreamfleetError(f"{what} {uri}: the S3 credentials were refused for bucket {bucket!r} "
                                  f"({code}); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the "
                                  "bucket policy") from None
        raise DreamfleetError(f"{what} {uri}: S3 error {code} ({e})") from None


class ConditionalObjects:
    """Compare-and-set on S3 objects: create-if-absent and replace-if-unchanged (ETag)."""

    def __init__(self, uri: str):
        self.bucket, self.prefix = split_s3(uri)
        self.client = s3_client()

    def key(self, path: str) -> str:
        """Key of a ``bucket/...`` path as the pyarrow filesystem names it."""
        return path.split("/", 1)[1] if path.startswith(self.bucket + "/") else path

    def _precondition_failed(self, e: Exception) -> bool:
        err = getattr(e, "response", {}) or {}
        code = str(err.get("Error", {}).get("Code", ""))
        status = err.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def create(self, path: str, body: bytes) -> bool:
        """Write ``path`` only if no object is there (``If-None-Match: *``); False if one was."""
        import botocore.exceptions as bx

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=body, IfNoneMatch="*")
            return True
        except bx.ClientError as e:
            if self._precondition_failed(e):
                return False
            raise

    def read(self, path: str) -> tuple[bytes | None, str | None]:
        """(body, ETag), or (None, None) when there is no object."""
        import botocore.exceptions as bx

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key(path))
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None, None
            raise
        return got["Body"].read(), got["ETag"]

    def put(self, path: str, body: bytes) -> None:
        """Write ``path`` unconditionally, in one request."""
        self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=body)

    def replace(self, path: str, body: bytes, etag: str | None) -> bool:
        """Write ``path`` only if it still has ``etag`` (or, for None, still does not exist)."""
        if etag is None:
            return self.create(path, body)
        import botocore.exceptions as bx

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(path), Body=body, IfMatch=etag)
            return True
        except bx.ClientError as e:
            if self._precondition_failed(e) or e.response.get("Error", {}).get("Code") == "NoSuchKey":
                return False
            raise
