"""Giving the C heap's free memory back to the system.

Start-up (imports, the first connection) and an update (download, verify,
unpack) leave freed blocks in glibc's heap that it keeps mapped: the
long-running daemon hands them back when either is done (about 0.5-1 MB at
start-up; bench/agent.py). malloc_trim is glibc's: elsewhere (musl) this
does nothing.
"""

from __future__ import annotations

import ctypes
import gc


def trim() -> None:
    gc.collect()  # what only the cycle collector frees goes first, then the heap is trimmed
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # no glibc: nothing to hand back this way
        pass
