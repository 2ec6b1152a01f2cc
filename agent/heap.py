"""The daemon's C heap: one arena, and its free memory given back to the system.

glibc gives each thread that allocates an arena of its own (up to 8 per
core), each keeping its own free memory; the daemon's few threads allocate
little and seldom at once, so one arena for all of them holds less (~0.3 MB
idle, bench/agent.py). Start-up (imports, the first connection) and an
update (download, verify, unpack) leave freed blocks that glibc keeps
mapped: the long-running daemon hands them back when either is done (about
0.5-1 MB at start-up). Both are glibc's: elsewhere (musl) they do nothing.
"""

from __future__ import annotations

import ctypes
import gc

M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def one_arena() -> None:
    """Every thread allocates from the main arena; call before the daemon starts threads."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # no glibc
        pass


def trim() -> None:
    gc.collect()  # what only the cycle collector frees goes first, then the heap is trimmed
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # no glibc: nothing to hand back this way
        pass
