"""Checks on names, tags and file paths that come from users.

Model names become OCI repository names (`models/<name>`) later, so they
follow that grammar: lower case, digits and . _ - separators.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

MAX_NAME = 64
MAX_TAG_KEY = 64
MAX_TAG_VALUE = 256
MAX_PATH = 255
MAX_FILES = 1000

_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd])")  # ASCII digits: \d also takes "٣"
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME_RE = re.compile(r"^[a-z0-9]+(?:[._-][a-z0-9]+)*$")
_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


class InvalidInput(ValueError):
    """User input that breaks a rule; the message names the rule."""


def is_number(text: str) -> bool:
    """Only the ASCII digits 0-9: str.isdigit also takes '²' (which int() refuses) and
    '٣' (which int() reads as 3), and a number the user sees must be the one stored."""
    return text.isascii() and text.isdigit()


def version(value: int | str) -> int | str:
    """A version as a route or a body gives it: a number (ASCII digits) or 'latest'."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**9:
        return value
    if isinstance(value, str) and (value == "latest" or (is_number(value) and len(value) <= 9)):
        return value if value == "latest" else int(value)
    raise InvalidInput(f"version must be a number or 'latest', got {str(value)[:20]!r}")


def duration(text: str, what: str) -> int:
    """Seconds in '30s', '10m', '12h' or '7d' (WHAT names the option in the error)."""
    match = _DURATION_RE.fullmatch(text.strip())
    if not match:
        raise InvalidInput(f"{what} {text!r} should look like 30s, 30m, 12h or 7d")
    return int(match.group(1)) * _SECONDS[match.group(2)]


def model_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise InvalidInput(f"model name is {len(name)} characters long; the limit is {MAX_NAME}")
    if not _NAME_RE.match(name):
        raise InvalidInput(
            f"invalid model name {name!r}: use lower-case letters and digits, "
            "separated by single '.', '_' or '-' (e.g. 'diabetes-ridge')"
        )
    return name


def tag(key: str, value: str) -> tuple[str, str]:
    if not key or len(key) > MAX_TAG_KEY or not _TAG_KEY_RE.match(key):
        raise InvalidInput(
            f"invalid tag key {key[:80]!r}: 1-{MAX_TAG_KEY} characters of letters, digits, . _ / -"
        )
    if len(value) > MAX_TAG_VALUE or any(ord(c) < 32 for c in value):
        raise InvalidInput(
            f"invalid value for tag {key!r}: at most {MAX_TAG_VALUE} printable characters"
        )
    return key, value


def tags(mapping: dict[str, str]) -> dict[str, str]:
    return dict(tag(k, v) for k, v in mapping.items())


def parse_tag_selector(text: str) -> tuple[str, str]:
    """'key=value' as used on the command line and in ?tag= query parameters."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"tag filter {text[:80]!r} must look like key=value")
    return tag(key.strip(), value.strip())


def file_path(path: str) -> str:
    """A relative POSIX path that stays inside the model directory."""
    if not path or len(path) > MAX_PATH:
        raise InvalidInput(f"file name must be 1-{MAX_PATH} characters, got {len(path)}")
    if "\\" in path or "\x00" in path or any(ord(c) < 32 for c in path):
        raise InvalidInput(f"file name {path[:80]!r} contains a backslash or control character")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("..", ".", "") for part in path.split("/")):
        raise InvalidInput(
            f"file name {path[:80]!r} must be a relative path without '..' or '.' components"
        )
    return str(pure)
