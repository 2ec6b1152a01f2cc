"""Streaming uploads and downloads with progress bars and digest checks.

Files move in 1 MiB chunks and are hashed on the way, so a 1 GB model is
read once and never held in memory. Hashing and writing run in the thread
that moves the bytes: the kernel's socket buffers keep the transfer going
meanwhile, and the hub on the other end has the machine's other core. A
hashing thread beside the socket, handed each chunk and waited for before
the next, cost more than it gave on a busy 2-core machine, where every
hand-off waited for the scheduler (bench/registry.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
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


def upload_file(client: HubClient, path: Path, progress: Progress, task: TaskID) -> str:
    """Send PATH to the hub's blob store; returns its digest, checked on both ends."""
    sha = hashlib.sha256()
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                sha.update(chunk)
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
    try:
        with client.stream(url) as response, open(tmp, "wb") as out:
            # The pieces as they come off the socket (64 KiB): no re-chunking copy;
            # the progress bar is told once per CHUNK.
            held = 0
            for piece in response.iter_bytes():
                out.write(piece)
                sha.update(piece)
                held += len(piece)
                if held >= CHUNK:
                    advance(held)
                    held = 0
            advance(held)
        got = "sha256:" + sha.hexdigest()
        if got != digest:
            raise click.ClickException(
                f"{dest.name}: downloaded bytes are {got}, expected {digest}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
