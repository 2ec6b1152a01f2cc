"""Every name grammar of edgefleet, written once and checked whole with `re.fullmatch`.

The hub checks what users send with these, and the wire protocol and the
agent check what arrives with the same ones, so a name one side accepts is one
the other accepts. `re.match` with `^...$` would let a trailing newline
through ("diabetes\\n"); a `fullmatch` does not. Every refusal is one
`InvalidName` whose message is one line naming the rule. Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


class InvalidName(ValueError):
    """A name, tag, path or reference that breaks its grammar; the message names the rule."""


def _shown(text: str) -> str:
    """TEXT for an error message: quoted, escaped (one line), and cut short."""
    return repr(text[:80]) + ("..." if len(text) > 80 else "")


@dataclass(frozen=True)
class Grammar:
    """One kind of name: WHAT it is, its PATTERN, its length limits, the RULE in words."""

    what: str
    pattern: re.Pattern[str]
    rule: str
    max_len: int
    min_len: int = 1

    def matches(self, text: object) -> bool:
        return (
            isinstance(text, str)
            and self.min_len <= len(text) <= self.max_len
            and self.pattern.fullmatch(text) is not None
        )

    def check(self, text: object) -> str:
        """TEXT if it is a valid name of this kind, else InvalidName with one line."""
        if not isinstance(text, str):
            raise InvalidName(f"{self.what} must be text, got {type(text).__name__}")
        if len(text) > self.max_len:
            raise InvalidName(
                f"{self.what} is {len(text)} characters long; the limit is {self.max_len}"
            )
        if len(text) < self.min_len or self.pattern.fullmatch(text) is None:
            raise InvalidName(f"invalid {self.what} {_shown(text)}: {self.rule}")
        return text


# Model names become OCI repository components (models/<name>), so they follow
# that grammar, without its double separators.
MODEL_NAME = Grammar(
    "model name",
    re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*"),
    "use lower-case letters and digits, separated by single '.', '_' or '-' "
    "(e.g. 'diabetes-ridge')",
    max_len=64,
)
TAG_KEY = Grammar(
    "tag key",
    re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*"),
    "letters, digits, . _ / -, starting with a letter or digit",
    max_len=64,
)
TAG_VALUE = Grammar(
    "tag value",
    re.compile(r"[^\x00-\x1f]*"),
    "printable characters only (no newline, tab or other control character)",
    max_len=256,
    min_len=0,
)
# An OCI repository path: components as the distribution spec defines them.
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
REPOSITORY = Grammar(
    "repository",
    re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*"),
    "'/'-separated lower-case components of letters and digits joined by . _ __ or -",
    max_len=255,
)
OCI_TAG = Grammar(
    "tag",
    re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*"),
    "letters, digits, . _ -, not starting with '.' or '-'",
    max_len=128,
)
DIGEST = Grammar(
    "digest",
    re.compile(r"sha256:[0-9a-f]{64}"),
    "'sha256:' and 64 lower-case hex digits",
    max_len=71,
)
# A clean relative POSIX path: no empty, '.' or '..' part, no leading '/', no
# backslash, no control character (NUL included). It names a file under the
# model directory, in the hub's blob store and inside a package's tar.
_PART = r"(?!\.\.?(?:/|\Z))[^/\\\x00-\x1f]+"
RELATIVE_PATH = Grammar(
    "file name",
    re.compile(rf"{_PART}(?:/{_PART})*"),
    "not a clean relative path; use '/'-separated names without '.', '..', empty parts, "
    "a leading '/', backslashes or control characters",
    max_len=4096,
)
FILE_PATH = Grammar(RELATIVE_PATH.what, RELATIVE_PATH.pattern, RELATIVE_PATH.rule, max_len=255)

# An accelerator preference, best-first lists of which travel in desired states.
RUNTIME_CHOICE = Grammar(
    "accelerator preference",
    re.compile(r"[a-z0-9_]+:[A-Za-z0-9_.]+"),
    "RUNTIME:DEVICE, e.g. openvino:GPU or onnxruntime:CPU",
    max_len=128,
)

# A package variant of one model version (runtime, optimisation, platform set): a short
# name that becomes part of its OCI tag, VERSION-VARIANT (the default variant's is VERSION).
VARIANT = Grammar(
    "variant name",
    re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*"),
    "use lower-case letters and digits, separated by single '.', '_' or '-' (e.g. 'int8')",
    max_len=32,
)
DEFAULT_VARIANT = "default"
_PACKAGE_TAG = re.compile(r"(?P<version>[1-9][0-9]{0,17})(?:-(?P<variant>.+))?")

MODEL_REF = re.compile(r"(?P<name>[^:]+)(?::(?P<version>[1-9][0-9]*|latest))?")
_DURATION = re.compile(r"(?P<count>[0-9]{1,9})(?P<unit>[smhd])")  # ASCII: \d takes "٣"
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def is_number(text: str) -> bool:
    """Only the ASCII digits 0-9: str.isdigit also takes '²' (which int() refuses) and
    '٣' (which int() reads as 3), and a number the user sees must be the one stored."""
    return text.isascii() and text.isdigit()


def model_name(text: object) -> str:
    return MODEL_NAME.check(text)


def tag(key: object, value: object) -> tuple[str, str]:
    return TAG_KEY.check(key), TAG_VALUE.check(value)


def repository(text: object) -> str:
    return REPOSITORY.check(text)


def oci_tag(text: object) -> str:
    return OCI_TAG.check(text)


def digest(text: object) -> str:
    return DIGEST.check(text)


def relative_path(text: object) -> str:
    """A clean relative path of any length (a path inside a package's tar)."""
    return RELATIVE_PATH.check(text)


def partial_name(name: str) -> str:
    """Where a download of the file NAME is written until its digest is checked."""
    return f".{name}.part"


# What one part of a path may take: file systems allow 255 bytes a name (NAME_MAX),
# and a download's partial file adds its prefix and suffix to the last part.
MAX_NAME_BYTES = 255 - len(partial_name("").encode())


def file_path(text: object) -> str:
    """A registered model file's name: a clean relative path of at most 255 characters,
    each part short enough that a download can write it (MAX_NAME_BYTES)."""
    path = FILE_PATH.check(text)
    for part in path.split("/"):
        size = len(part.encode())
        if size > MAX_NAME_BYTES:
            raise InvalidName(f"file name {_shown(path)}: {_shown(part)} is {size} bytes; "
                              f"a part may have {MAX_NAME_BYTES} (a download adds "
                              f"{partial_name('')!r} to the 255 bytes file systems allow)")
    return path


def file_tree(paths: Iterable[str]) -> None:
    """PATHS can all be files at once: none is a directory of another ('a' beside 'a/b')."""
    files = set(paths)
    for path in sorted(files):
        parts = path.split("/")
        for end in range(1, len(parts)):
            parent = "/".join(parts[:end])
            if parent in files:
                raise InvalidName(f"file {_shown(parent)} would also be the directory of "
                                  f"{_shown(path)}; rename one of them")


def variant(text: object) -> str:
    return VARIANT.check(text)


def package_tag(version: int, variant_name: str = DEFAULT_VARIANT) -> str:
    """The OCI tag of VERSION's package VARIANT_NAME in repository models/NAME: the
    default variant keeps the plain version number, so packages from before variants
    are the default variant of their version."""
    variant(variant_name)
    return str(version) if variant_name == DEFAULT_VARIANT else f"{version}-{variant_name}"


def parse_package_tag(text: str) -> tuple[int, str] | None:
    """(version, variant) of a package tag; None for any other tag (signatures, bases)."""
    found = _PACKAGE_TAG.fullmatch(text)
    if found is None:
        return None
    name = found["variant"] or DEFAULT_VARIANT
    if not VARIANT.matches(name) or found["variant"] == DEFAULT_VARIANT:
        return None
    return int(found["version"]), name


def model_ref(text: str) -> tuple[str, int | None]:
    """"diabetes:2" -> ("diabetes", 2); "diabetes" and "diabetes:latest" -> ("diabetes", None)."""
    found = MODEL_REF.fullmatch(text.strip())
    if found is None:
        raise InvalidName(
            f"{_shown(text)} is not MODEL:VERSION (e.g. diabetes:2 or diabetes:latest)"
        )
    version = found["version"]
    return model_name(found["name"]), None if version in (None, "latest") else int(version)


def model_version(text: str) -> tuple[str, int]:
    """"diabetes:2" -> ("diabetes", 2): a reference to one version, named by its number."""
    name, version = model_ref(text)
    if version is None:
        raise InvalidName(
            f"{_shown(text)} is not MODEL:VERSION with a version number (e.g. diabetes:2)"
        )
    return name, version


def comma_list(text: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']: items stripped, empty ones dropped; None is no items."""
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def duration(text: str, what: str = "duration") -> int:
    """Seconds in '30s', '10m', '12h' or '7d' (WHAT names the option in the error)."""
    found = _DURATION.fullmatch(text.strip())
    if found is None:
        raise InvalidName(f"{what} {_shown(text)} should look like 30s, 30m, 12h or 7d")
    return int(found["count"]) * _SECONDS[found["unit"]]
