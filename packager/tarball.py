"""Reproducible tar streams: the same files give the same bytes on any machine, at any time.

What varies between machines is normalised away: entries are sorted by path,
every parent directory gets its own entry, owners are uid/gid 0 with no user
or group names, modes are 0644 for files (0755 if the source file is
executable) and 0755 for directories, and every mtime is the one given (the
caller's SOURCE_DATE_EPOCH). The format is POSIX pax, whose extended headers
appear only for long or non-ASCII names and never carry timestamps, because
integer mtimes fit the ustar field. Only regular files are stored: symlinks,
devices and empty directories are refused or left out, so nothing in a tar
depends on the host's filesystem beyond file contents.

Stdlib only.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, cast

from contract import names
from contract.errors import PackageError
from contract.names import InvalidName
from contract.oci import Sink

FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755


@dataclass(frozen=True)
class Entry:
    """One regular file of a tar: its relative POSIX path inside the tar, and its bytes."""

    path: str
    source: Path | bytes
    mode: int = FILE_MODE


def check_relative_path(name: str) -> str:
    """NAME if it is a clean relative POSIX path (contract.names), else PackageError."""
    try:
        return names.relative_path(name)
    except InvalidName as exc:
        raise PackageError(str(exc)) from None


def tree_entries(root: Path, prefix: str) -> list[Entry]:
    """Entries for every regular file under ROOT, placed under PREFIX inside the tar."""
    entries = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            continue
        relative = path.relative_to(root).as_posix()
        if not stat.S_ISREG(info.st_mode):
            raise PackageError(
                f"{path} is not a regular file (symlink or special file); "
                "replace it with a copy of its target before packaging"
            )
        mode = EXEC_MODE if info.st_mode & 0o111 else FILE_MODE
        entries.append(Entry(f"{prefix}/{relative}", path, mode))
    return entries


def write_tar(sink: Sink, entries: Iterable[Entry], *, mtime: int) -> None:
    """Write ENTRIES to SINK as a tar stream; SINK only needs write()."""
    files: dict[str, Entry] = {}
    for entry in entries:
        path = check_relative_path(entry.path)
        if path in files:
            raise PackageError(f"two files would be written to {path} in one tar")
        files[path] = entry
    directories = {
        parent.as_posix()
        for path in files
        for parent in PurePosixPath(path).parents
        if parent != PurePosixPath(".")
    }
    clash = directories & files.keys()
    if clash:
        raise PackageError(f"{min(clash)} is both a file and a directory in one tar")
    # Stream mode ("w|") only calls write(); pax keeps long and non-ASCII names intact.
    with tarfile.open(fileobj=cast(IO[bytes], sink), mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directories | files.keys()):
            file = files.get(path)
            if file is None:
                tar.addfile(_info(path, tarfile.DIRTYPE, DIR_MODE, 0, mtime))
            elif isinstance(file.source, bytes):
                info = _info(path, tarfile.REGTYPE, file.mode, len(file.source), mtime)
                tar.addfile(info, io.BytesIO(file.source))
            else:
                with open(file.source, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    tar.addfile(_info(path, tarfile.REGTYPE, file.mode, size, mtime), f)


def _info(path: str, kind: bytes, mode: int, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def rewrite_tar(source: Path, sink: Sink, *, mtime: int) -> int:
    """Write the tar SOURCE (a root filesystem) to SINK reproducibly; the entries left out.

    Unlike `write_tar` this keeps what a root filesystem needs: symlinks, hard
    links, owners (numeric only) and modes with setuid bits. Entries are sorted
    by path, every mtime is MTIME, and extended headers are dropped (xattrs
    and sub-second times differ between builds). Device nodes and fifos are
    left out: container engines make /dev themselves. A hard link always points
    at the first path of its group in sorted order.
    """
    skipped = 0
    with tarfile.open(source, mode="r:*") as tar:
        members: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            path = member.name.removeprefix("./").rstrip("/")
            if not path or path == ".":
                continue
            check_relative_path(path)
            if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
                skipped += 1
                continue
            members[path] = member
        # Hard-link groups: the original file and its links, keyed by the original's path.
        groups: dict[str, list[str]] = {}
        for path, member in members.items():
            if member.islnk():
                target = member.linkname.removeprefix("./")
                if target not in members or not members[target].isreg():
                    raise PackageError(
                        f"hard link {path} points at {target}, not a file in the tar"
                    )
                groups.setdefault(target, [target]).append(path)
        first = {path: min(group) for group in groups.values() for path in group}
        with tarfile.open(
            fileobj=cast(IO[bytes], sink), mode="w|", format=tarfile.PAX_FORMAT
        ) as out:
            for path in sorted(members):
                member = members[path]
                original = member.linkname.removeprefix("./") if member.islnk() else path
                info = _info(path, member.type, member.mode, 0, mtime)
                info.uid, info.gid = member.uid, member.gid
                if member.isdir() or member.issym():
                    info.linkname = member.linkname
                    out.addfile(info)
                elif first.get(path, path) != path:
                    info.type, info.linkname = tarfile.LNKTYPE, first[path]
                    out.addfile(info)
                else:
                    data = members[original]
                    info.type, info.mode, info.size = tarfile.REGTYPE, data.mode, data.size
                    info.uid, info.gid = data.uid, data.gid
                    out.addfile(info, tar.extractfile(data))
    return skipped
