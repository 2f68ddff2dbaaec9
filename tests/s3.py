"""A real S3 API for the tests: moto's standalone server (``moto_server``) in its own process,
with its conditional writes made atomic as S3's are (``moto_s3_server.py``).

``S3Server.start()`` launches it on a free 127.0.0.1 port; ``env()`` is what a client (this
process, Ray nodes, subprocesses) needs in its environment; ``requests()`` returns what the
server recorded (moto's request recorder), to count S3 requests per operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from helpers import free_port


class S3Server:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(self.workdir / "recording.jsonl")}
        server = Path(__file__).with_name("moto_s3_server.py")  # moto_server, conditional writes atomic as on S3
        with open(self.workdir / "moto.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(server), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1)
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited ({self.workdir / 'moto.log'})") from None
                time.sleep(0.2)
        raise RuntimeError("moto_server did not start in 60 s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def bucket(self, prefix: str = "df") -> str:
        """A fresh bucket's name."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name

    def _api(self, path: str, method: str = "POST") -> bytes:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/recorder/{path}", method=method)
        return urllib.request.urlopen(req, timeout=10).read()

    def record(self) -> None:
        """Start recording requests afresh."""
        self._api("reset-recording")
        self._api("start-recording")

    def requests(self) -> list[dict]:
        """The requests recorded since ``record()``: method, path, headers."""
        self._api("stop-recording")
        text = self._api("download-recording", method="GET").decode()
        # moto's threads append records without a lock: concurrent requests can share a line
        decoder, out, i = json.JSONDecoder(), [], 0
        while (i := _skip_space(text, i)) < len(text):
            record, i = decoder.raw_decode(text, i)
            out.append(record)
        return out


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


class Outage:
    """A TCP proxy in front of the S3 server whose ``down()`` closes its port and every open
    connection, as a restarting server does, and ``up()`` listens again on the same port.
    The store's data survives (as it does for MinIO or S3 itself; moto keeps it in memory)."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target_port = target_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._socket, self._threading = socket, threading
        self._conns: list = []
        self._listener = None
        self.up()

    def env(self, server: S3Server) -> dict[str, str]:
        return {**server.env(), "AWS_ENDPOINT_URL": self.endpoint}

    def up(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self._listener = s
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(self._socket.SHUT_RDWR)
            c.close()
        self._conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
