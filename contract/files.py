"""Writing files so a power loss leaves the old or the new content, never half, and
secrets (keys, tokens, passwords) readable by their owner only from the first byte.

Every file the agent persists and every secret the hub, the CLI and the agent
write goes through `write_atomic`: a temporary file in the same directory,
created with its final mode (a chmod afterwards would leave a window),
fsynced, renamed over the target (or linked, to keep a file that is already
there), and the directory fsynced so the rename itself survives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SECRET_MODE = 0o600


def write_atomic(path: Path, data: bytes, *, mode: int = 0o644, replace: bool = True) -> bool:
    """DATA at PATH with MODE; with REPLACE false a PATH that exists is kept. True if written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # the umask may have taken bits away
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if PATH exists, where a rename would replace it
            except FileExistsError:
                return False
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


def write_secret(path: Path, data: bytes | str, *, replace: bool = True) -> bool:
    """DATA at PATH with mode 0600 (parents made as needed); with REPLACE false a secret
    that is already there is kept (a first start makes it, later starts reuse it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    return write_atomic(path, raw, mode=SECRET_MODE, replace=replace)


def write_json(path: Path, value: Any, *, mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode(), mode=mode)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
