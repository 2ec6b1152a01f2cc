"""Checks on names, tags and file paths that come from users.

The grammars are the contract's (contract/names.py), shared with the wire
protocol and the agent, so whatever the hub stores a device accepts; they are
imported here so the hub has one module of input checks. This module adds the
hub's own limits and forms: how many files a version has, a tag mapping, and
the key=value selectors of the command line and of ?tag= queries. Grammar
refusals are `InvalidName`, the hub's other refusals `InvalidInput` (a kind of
it); the API answers both with 422 and their one line.
"""

from __future__ import annotations

from contract.names import (
    InvalidName,
    duration,
    file_path,
    file_tree,
    is_number,
    model_name,
    tag,
)

__all__ = [
    "MAX_FILES", "InvalidInput", "InvalidName", "duration", "file_path", "file_tree", "is_number",
    "model_name", "parse_tag_selector", "tag", "tags", "version",
]

MAX_FILES = 1000
MAX_VERSION = 10**9 - 1  # `version()` reads at most nine digits
MAX_OFFSET = 10**9  # list offsets: far past any page, well inside SQLite's integers


class InvalidInput(InvalidName):
    """User input that breaks one of the hub's own rules; the message names the rule."""


def version(value: int | str) -> int | str:
    """A version as a route or a body gives it: a number (ASCII digits) or 'latest'."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9:
        return value
    if isinstance(value, str) and (value == "latest" or (is_number(value) and len(value) <= 9)):
        return value if value == "latest" else int(value)
    raise InvalidInput(f"version must be a number or 'latest', got {str(value)[:20]!r}")


def tags(mapping: dict[str, str]) -> dict[str, str]:
    return dict(tag(k, v) for k, v in mapping.items())


def parse_tag_selector(text: str) -> tuple[str, str]:
    """'key=value' as used on the command line and in ?tag= query parameters."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"tag filter {text[:80]!r} must look like key=value")
    return tag(key.strip(), value.strip())
