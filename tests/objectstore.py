"""A private S3-compatible object store for the tests: SeaweedFS's `weed server`
(built by .ci/object-store) with its master, volume server, filer and S3 gateway
on free ports of 127.0.0.1, a data dir of its own, one access key and one bucket,
and a fresh key prefix per test (each bucket is a SeaweedFS collection with volumes
of its own, so a bucket per test would soon use up the volume server's slots)."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.storage.s3 import Credentials, S3Client, S3Error, S3Location

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = Credentials("edgefleet-test", "edgefleet-test-secret")


def _free_port() -> int:
    # gRPC listens on the port + 10000, so it must fit too.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < 55000:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def weed_path() -> Path:
    found = subprocess.run(["bash", str(ROOT / ".ci" / "object-store"), "--path"],
                           capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"the object store is not built: {found.stderr.strip()}")
    return Path(found.stdout.strip())


def _create_bucket(client: S3Client) -> None:
    connection, response = client.request("PUT", None)
    response.read()
    connection.close()


class ObjectStore:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-s3-"))
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._names = itertools.count()
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "edgefleet", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": CREDENTIALS.access_key,
                             "secretKey": CREDENTIALS.secret_key}]}]}))
        (self.dir / "data").mkdir()
        with open(self.dir / "log", "wb") as log:
            self.process = subprocess.Popen(
                [weed_path(), "server", "-dir", self.dir / "data", "-ip", "127.0.0.1",
                 "-ip.bind", "127.0.0.1", "-master.port", str(_free_port()),
                 "-volume.port", str(_free_port()), "-filer", "-filer.port",
                 str(_free_port()), "-s3", "-s3.port", str(self.port), "-s3.config", config,
                 "-s3.port.iceberg", "0", "-s3.port.lance", "0",
                 "-master.volumeSizeLimitMB", "64", "-volume.max", "20"],
                stdout=log, stderr=subprocess.STDOUT)
        self.bucket = "edgefleet-test"
        probe = self.client(self.bucket)
        deadline = time.monotonic() + 60
        while True:
            try:
                _create_bucket(probe)
                break
            except S3Error:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError((self.dir / "log").read_text()[-4000:]) from None
                time.sleep(0.3)

    def client(self, bucket: str, prefix: str = "",
               credentials: Credentials = CREDENTIALS) -> S3Client:
        return S3Client(S3Location(self.endpoint, bucket, prefix), credentials, timeout=10)

    def new_prefix(self) -> str:
        return f"test-{next(self._names)}"

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def object_store() -> Iterator[ObjectStore]:
    store = ObjectStore()
    yield store
    store.stop()
