"""The enrollment file: what a device needs to join a fleet, written once, read strictly.

`edgefleet agent install` writes it (root-only, /etc/edgefleet/enrollment.conf), a device
image carries it on its boot partition, and `edgefleet agent run --enrollment-file` reads
it. One `key=value` per line, `#` comments; unknown or repeated keys are refused so a typo
is an error and not a silently ignored setting. The token is removed once the device has
enrolled (`without_token`): the hub URL stays, and the hub's CA in the device's data dir.

The hub's CA is pinned by the token alone (`efe_<secret>.<sha256 of the CA>`, see
contract/tls.py): an https:// hub needs a pinned token, an http:// one (a hub run with
--insecure) a token without a pin. There is no separate fingerprint key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from contract import tls

_SECRET = re.compile(r"efe_[A-Za-z0-9_-]{8,200}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_API_KEY = re.compile(r"[A-Za-z0-9_-]{16,128}")
KEYS = ("hub", "token", "name", "serving_api_key")


class EnrollmentFileError(ValueError):
    """The enrollment file cannot be used; the message names the line or the key."""


@dataclass(frozen=True)
class EnrollmentConfig:
    hub: str
    token: str | None = None  # efe_<secret>, with .<sha256 of the hub's CA> for an https hub
    name: str | None = None
    # The scoring API's key for the devices of a batch (default: each device makes its own).
    serving_api_key: str | None = None

    def __post_init__(self) -> None:
        _check("hub", self.hub)
        for key in KEYS[1:]:
            value = getattr(self, key)
            if value is not None:
                _check(key, value)
        if self.token is not None:
            try:
                tls.check_pin(self.hub, tls.split_token(self.token)[1])
            except tls.TlsError as exc:
                raise EnrollmentFileError(f"token: {exc}") from None

    def without_token(self) -> EnrollmentConfig:
        return replace(self, token=None)


def _check(key: str, value: str) -> None:
    if key == "hub":
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise EnrollmentFileError(f"hub: {value!r} is no http(s)://host[:port] URL")
    elif key == "token":
        try:
            secret = tls.split_token(value)[0]
        except tls.TlsError as exc:
            raise EnrollmentFileError(f"token: {exc}") from None
        if not _SECRET.fullmatch(secret):
            raise EnrollmentFileError("token: not an enrollment token (efe_...)")
    elif key == "name" and not _NAME.fullmatch(value):
        raise EnrollmentFileError(f"name: {value!r} is no device name (letters, digits, ._-)")
    elif key == "serving_api_key" and not _API_KEY.fullmatch(value):
        raise EnrollmentFileError("serving_api_key: needs 16-128 letters, digits, _ or -")


def parse(text: str) -> EnrollmentConfig:
    """The file's content; EnrollmentFileError names the first thing wrong (never the token)."""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise EnrollmentFileError(f"line {number}: expected key=value")
        if key == "ca_fingerprint":
            raise EnrollmentFileError(f"line {number}: no ca_fingerprint key: the token "
                                      "(efe_....<64 hex digits>, as the hub prints it) pins the CA")
        if key not in KEYS:
            raise EnrollmentFileError(f"line {number}: unknown key {key!r} "
                                      f"(known: {', '.join(KEYS)})")
        if key in values:
            raise EnrollmentFileError(f"line {number}: {key} given twice")
        values[key] = value
    if "hub" not in values:
        raise EnrollmentFileError("hub: missing")
    return EnrollmentConfig(**values)


def render(config: EnrollmentConfig) -> str:
    """The file for CONFIG, checked by reading it back."""
    lines = ["# edgefleet enrollment: read by `edgefleet agent run --enrollment-file`"]
    lines += [f"{key}={getattr(config, key)}" for key in KEYS if getattr(config, key) is not None]
    text = "\n".join(lines) + "\n"
    if parse(text) != config:
        raise AssertionError("enrollment file does not read back as written")
    return text
