"""The registry client against the hub's real /v2/: resumable, checked downloads."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contract.errors import VerificationError
from contract.oci import Descriptor
from hubproc import HubProcess
from packager.distribution import Registry

DATA = bytes(range(256)) * 4096  # 1 MiB


class CountingRegistry(Registry):
    """Counts the blob bytes that really cross the wire."""

    fetched = 0

    def open_blob(self, repo: str, digest: str, *, offset: int = 0) -> Iterator[bytes]:
        for chunk in super().open_blob(repo, digest, offset=offset):
            self.fetched += len(chunk)
            yield chunk


@pytest.fixture
def blob(hub: HubProcess) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(DATA).hexdigest()
    answer = httpx.post(f"{hub.url}/v2/models/resume/blobs/uploads/", params={"digest": digest},
                        content=DATA, headers={"Authorization": f"Bearer {hub.admin_token}"})
    assert answer.status_code == 201, answer.text
    return Descriptor("application/octet-stream", digest, len(DATA))


def test_an_interrupted_download_resumes_where_it_stopped(hub: HubProcess, blob: Descriptor,
                                                           tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(DATA[:300_000])  # what an earlier attempt left
    with CountingRegistry(hub.url, hub.admin_token) as registry:
        registry.download_blob("models/resume", blob, dest)
        assert registry.fetched == len(DATA) - 300_000
    assert dest.read_bytes() == DATA and not (tmp_path / "blob.part").exists()


def test_corrupt_partial_bytes_are_caught_and_dropped(hub: HubProcess, blob: Descriptor,
                                                      tmp_path: Path) -> None:
    dest = tmp_path / "blob"
    (tmp_path / "blob.part").write_bytes(b"\xff" * 1000)  # not the blob's first bytes
    with Registry(hub.url, hub.admin_token) as registry:
        with pytest.raises(VerificationError, match="arrived as"):
            registry.download_blob("models/resume", blob, dest)
        assert not dest.exists() and not (tmp_path / "blob.part").exists()
        registry.download_blob("models/resume", blob, dest)  # a clean second try works
    assert dest.read_bytes() == DATA
