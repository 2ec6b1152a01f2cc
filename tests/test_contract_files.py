"""contract/files.py: atomic writes, and secrets that are 0600 from the first byte."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from contract.files import read_json, write_atomic, write_json, write_secret


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_secret_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert write_secret(tmp_path / "deep" / "key", "s3cret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "deep" / "key") == 0o600
    assert (tmp_path / "deep" / "key").read_text() == "s3cret"
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["key"]  # no temporary left


def test_a_kept_secret_is_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "token"
    assert write_secret(path, b"first", replace=False)
    assert not write_secret(path, b"second", replace=False)
    assert path.read_bytes() == b"first" and mode(path) == 0o600
    assert write_secret(path, b"third")
    assert path.read_bytes() == b"third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_atomic_writes_replace_and_keep_their_mode(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_json(path, {"a": 1})
    write_atomic(path, b'{"a": 2}')
    assert read_json(path) == {"a": 2} and mode(path) == 0o644
