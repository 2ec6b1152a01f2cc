"""Streaming uploads and downloads with progress bars and digest checks.

Files move in 1 MiB chunks and are hashed on the way, so a 1 GB model is
read once and never held in memory; the hashing (and a download's writes)
run in a thread beside the socket.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from contract import names
from hub.cli.client import HubClient
from hub.cli.output import TextColumn

CHUNK = 1 << 20


def progress_bar(*, quiet: bool = False) -> Progress:
    return Progress(
        TextColumn(),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=quiet,
        transient=False,
    )


class Overlapped:
    """Runs jobs one at a time in a thread while the caller goes on: hashing and
    file writes let go of the GIL, so they overlap the socket instead of taking
    turns with it (taking turns cost uploads and downloads half their speed).
    A job starts once the one before it has finished, so they run in order and
    only one job's data is held; leaving the block waits for the last one and
    raises its error."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1)
        self._last: Future[None] | None = None

    def __enter__(self) -> Overlapped:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.wait()
        finally:
            self._thread.shutdown()

    def wait(self) -> None:
        if self._last is not None:
            self._last.result()

    def run(self, job: Callable[..., None], *args: object) -> None:
        self.wait()
        self._last = self._thread.submit(job, *args)


def upload_file(client: HubClient, path: Path, progress: Progress, task: TaskID) -> str:
    """Send PATH to the hub's blob store; returns its digest, checked on both ends."""
    sha = hashlib.sha256()
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f, Overlapped() as hashing:
            while chunk := f.read(CHUNK):
                hashing.run(sha.update, chunk)
                progress.advance(task, len(chunk))
                yield chunk

    answer = client.post(
        "/api/v1/blobs",
        content=chunks(),
        headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
    )
    digest = "sha256:" + sha.hexdigest()
    if answer.get("digest") != digest or answer.get("size") != size:
        raise click.ClickException(
            f"{path}: the hub stored {answer.get('digest')} ({answer.get('size')} bytes) but the "
            f"file is {digest} ({size} bytes); did it change during the upload?"
        )
    return digest


def download_file(
    client: HubClient, url: str, dest: Path, digest: str, advance: Callable[[int], None]
) -> None:
    """Fetch URL into DEST through a temporary file, keeping it only if the digest matches.

    ADVANCE is told the size of each chunk as it arrives.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(names.partial_name(dest.name))
    sha = hashlib.sha256()

    def save(chunks: list[bytes]) -> None:
        for chunk in chunks:
            out.write(chunk)
            sha.update(chunk)

    try:
        with client.stream(url) as response, open(tmp, "wb") as out, Overlapped() as saving:
            # The pieces as they come off the socket (64 KiB), saved a batch at a time:
            # no re-chunking copy, one thread hand-off per CHUNK.
            batch: list[bytes] = []
            held = 0
            for piece in response.iter_bytes():
                batch.append(piece)
                held += len(piece)
                if held >= CHUNK:
                    saving.run(save, batch)
                    advance(held)
                    batch, held = [], 0
            saving.run(save, batch)
            advance(held)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            raise click.ClickException(
                f"{dest.name}: downloaded bytes are {got}, expected {digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
