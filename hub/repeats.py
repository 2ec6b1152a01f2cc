"""Log lines that repeat, at most one per kind per interval, with counts.

10,000 malformed messages from one device were 10,000 WARNING lines: the log
of an attacked hub said nothing else, and its disk filled. The messages are
counted anyway (`GET /fleet/status`), so the log needs one line per kind of
problem now and then, saying how many more there were.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass
class _Seen:
    logged_at: float
    held_back: int = 0  # lines like it not logged since


class Repeats:
    """Logs a line for KEY at most once per INTERVAL seconds; the next line logged
    for that key says how many were held back. CLOCK is injected for tests."""

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0,
                 level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.logger, self.interval, self.level, self.clock = logger, interval, level, clock
        self._seen: dict[Hashable, _Seen] = {}

    def note(self, key: Hashable, line: str, count: int = 1) -> None:
        """COUNT events of KEY happened; LINE describes the latest."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.logged_at < self.interval:
            seen.held_back += count
            return
        held_back = (seen.held_back if seen else 0) + count - 1
        if held_back:
            line += f" (and {held_back} more like it since the last such line)"
        self.logger.log(self.level, "%s", line)
        self._seen[key] = _Seen(now)

    def flush(self) -> None:
        """Log the counts still held back (at shutdown)."""
        for key, seen in self._seen.items():
            if seen.held_back:
                self.logger.log(self.level, "%d more like %r were not logged", seen.held_back,
                                key)
                seen.held_back = 0
