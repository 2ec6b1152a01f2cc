"""The MQTT wire protocol between the hub and its agents, in one module.

Both sides import this, so a topic name, a field or a limit is defined once.
It does no I/O: it names topics, builds payloads (bytes) and parses payloads
strictly. Every parse error is a `ProtocolError` whose message names the
field and the rule; a desired state the agent will not apply is a
`ProtocolRefusal` carrying a stable reason code that the agent reports back.

| topic (under edgefleet/v1/devices/{id}) | payload                          |
|-----------------------------------------|----------------------------------|
| desired            hub -> device, retained | signed `DesiredState`          |
| reported           device -> hub           | `ReportedState`                |
| telemetry          device -> hub           | `TelemetryBatch`               |
| status             device -> hub, retained | b"online" / b"offline" (will)  |
| commands           hub -> device           | signed `Command` (not retained)|
| commands/{cid}/result  device -> hub       | reserved, not used: a command's |
|                                            | `CommandResult` goes by HTTPS   |

Documents are JSON objects with a "schema" field; unknown fields are errors,
so a newer peer fails loudly instead of being half understood. Timestamps are
UTC, "2025-01-31T12:00:00.000000Z" (fixed width, so they also sort as text).
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn, Protocol, cast

from contract import names
from contract.canonical import canonical_json
from contract.settings import Settings, SettingsError
from contract.sketch import SketchError, SketchSpec, check_sketches, read_counts

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec


class ProtocolError(ValueError):
    """A payload or topic breaks the protocol; the message says where and how."""


class Reason(StrEnum):
    """Why an agent refused a desired state: stable codes, reported to the hub."""

    MALFORMED = "malformed"                  # not JSON, or not the document's shape
    UNSUPPORTED_SCHEMA = "unsupported_schema"  # a schema this agent does not know
    BAD_SIGNATURE = "bad_signature"          # unsigned, tampered, or another key
    WRONG_DEVICE = "wrong_device"            # addressed to another device
    # The retained desired state arrives again after every (re)subscribe, so
    # "same generation" is normal; agents ignore it instead of reporting it.
    ALREADY_APPLIED = "already_applied"
    REPLAY = "replay"                        # an older generation: rollback or replay
    EXPIRED = "expired"                      # past expires_at: a frozen, withheld hub
    NOT_YET_VALID = "not_yet_valid"          # issued in the future beyond CLOCK_SKEW
    # Raised by the agent's download step, not here: a package whose bytes do
    # not match the digest the signed desired state names (mix-and-match).
    DIGEST_MISMATCH = "digest_mismatch"
    # Signed by a hub key this device has rotated away from (contract/keys.py).
    RETIRED_KEY = "retired_key"


class ProtocolRefusal(ProtocolError):
    """A desired state the agent will not apply, with the reason it reports."""

    def __init__(self, reason: Reason, message: str, *, generation: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.generation = generation  # as claimed by the document, when it had one


# --- limits -----------------------------------------------------------------

MAX_DESIRED_BYTES: Final = 256 * 1024
MAX_REPORTED_BYTES: Final = 256 * 1024
MAX_TELEMETRY_BYTES: Final = 1024 * 1024
MAX_TELEMETRY_POINTS: Final = 1000
MAX_VALUES_PER_POINT: Final = 64
MAX_DEPLOYMENTS: Final = 64
MAX_REFUSALS: Final = 16          # the agent reports its most recent refusals only
MAX_TEXT: Final = 2000            # error and refusal messages
CLOCK_SKEW: Final = timedelta(minutes=5)

_MAX_INT: Final = 2**63 - 1       # what SQLite and most JSON readers keep exactly

# --- topics -----------------------------------------------------------------

ROOT: Final = "edgefleet/v1"
_DEVICES: Final = f"{ROOT}/devices"

Kind = Literal["desired", "reported", "telemetry", "status", "commands"]
_KINDS: Final = ("desired", "reported", "telemetry", "status", "commands")

# Device ids become topic levels: no "/", "+", "#" or leading "$".
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _check_id(value: str, what: str = "device id") -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(
            f"{what} {value!r} is not valid: use 1-128 of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return value


def desired_topic(device_id: str) -> str:
    return f"{_DEVICES}/{_check_id(device_id)}/desired"


def reported_topic(device_id: str) -> str:
    return f"{_DEVICES}/{_check_id(device_id)}/reported"


def telemetry_topic(device_id: str) -> str:
    return f"{_DEVICES}/{_check_id(device_id)}/telemetry"


def status_topic(device_id: str) -> str:
    return f"{_DEVICES}/{_check_id(device_id)}/status"


def commands_topic(device_id: str) -> str:
    return f"{_DEVICES}/{_check_id(device_id)}/commands"


# What the hub's ingest loop subscribes to: everything devices send over MQTT (a
# command's result goes over HTTPS: the device learns whether it was stored).
HUB_SUBSCRIPTIONS: Final = (
    f"{_DEVICES}/+/reported",
    f"{_DEVICES}/+/telemetry",
    f"{_DEVICES}/+/status",
)


def device_subscriptions(device_id: str) -> tuple[str, str]:
    """What an agent subscribes to: its desired state and its commands."""
    return desired_topic(device_id), commands_topic(device_id)


def parse_topic(topic: str) -> tuple[str, Kind]:
    """(device_id, kind) of a concrete edgefleet topic; ProtocolError otherwise."""
    parts = topic.split("/") if isinstance(topic, str) else []
    if parts[:3] == ["edgefleet", "v1", "devices"] and len(parts) == 5 \
            and _ID.fullmatch(parts[3]) and parts[4] in _KINDS:
        return parts[3], cast(Kind, parts[4])
    raise ProtocolError(
        f"topic {topic!r} is not an edgefleet topic: expected {_DEVICES}/<device id>/"
        "desired|reported|telemetry|status|commands"
    )


# --- JSON -------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers could otherwise disagree about which duplicate counts,
    # so the signed and the applied document would differ.
    result = dict(pairs)
    if len(result) < len(pairs):  # rare: then find which
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ProtocolError(f"number {text} is out of range")
    return number


def _not_a_number(text: str) -> NoReturn:
    raise ProtocolError(f"{text} is not valid JSON")


# Made once: json.loads with options makes a new decoder, and scanner, every call.
_STRICT = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=_finite,
                           parse_constant=_not_a_number)
# Floats can be valid only among a telemetry point's values, where _read_values
# bounds them, infinity included: the per-float check of _finite is not needed there.
_TELEMETRY = json.JSONDecoder(object_pairs_hook=_no_duplicates,
                              parse_constant=_not_a_number)


def _load(payload: bytes, *, limit: int, what: str,
          decoder: json.JSONDecoder = _STRICT) -> object:
    if not isinstance(payload, bytes | bytearray):
        raise ProtocolError(f"{what} must be bytes, not {type(payload).__name__}")
    if len(payload) > limit:
        raise ProtocolError(f"{what} is {len(payload)} bytes; the limit is {limit}")
    try:
        # Decode explicitly: json.loads on bytes would also accept UTF-16/32.
        return decoder.decode(payload.decode("utf-8"))
    except ProtocolError as exc:
        raise ProtocolError(f"{what}: {exc}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {exc}") from None


class FastJson(Protocol):
    """What `_load_canonical` needs of a fast JSON codec: orjson's module has it. The
    hub passes it in; the contract itself needs only the standard library."""

    OPT_SORT_KEYS: int

    def loads(self, data: bytes, /) -> Any: ...
    def dumps(self, obj: Any, /, default: Any = ..., option: int | None = ...) -> bytes: ...


def _load_canonical(payload: bytes, *, limit: int, what: str, decoder: json.JSONDecoder,
                    fast: FastJson) -> object:
    """`_load` with DECODER, the same documents read and the same errors, faster for
    what peers send: canonical JSON (contract/canonical.py). FAST (orjson) reads the
    payload, and the result stands only if FAST writes it back, keys sorted, as exactly
    the payload's bytes. That proves the payload had no duplicate key at any depth
    (orjson keeps one of two and never writes one twice) and that DECODER would
    read the same document (ints written without a point or an exponent, floats
    with one, each float the shortest text that reads back as itself). Anything
    else (a duplicate, whitespace, unsorted keys, an escape written otherwise, an
    integer beyond 64 bits, depth, invalid UTF-8 or JSON) goes to `_load`, which
    refuses it or reads it as it always did."""
    if isinstance(payload, bytes) and len(payload) <= limit:
        try:
            document = fast.loads(payload)
            if fast.dumps(document, option=fast.OPT_SORT_KEYS) == payload:
                return document
        except (ValueError, TypeError):  # orjson's JSONDecodeError and JSONEncodeError
            pass
    return _load(payload, limit=limit, what=what, decoder=decoder)


def format_time(moment: datetime) -> str:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    # isoformat, not strftime: glibc's %Y writes the year 999 as "999", not "0999".
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def parse_time(text: str) -> datetime:
    if not isinstance(text, str):
        _not_a_time(text)
    return _parse_time_text(text)


# A batch's points, and a fleet's in the same second, share their times. Only times
# that parse are kept (an exception is not cached), so no entry is long.
@functools.lru_cache(maxsize=256)
def _parse_time_text(text: str) -> datetime:
    if not _TIME.fullmatch(text):
        _not_a_time(text)
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise ProtocolError(f"{text!r} is not a real date and time") from None


def _not_a_time(text: object) -> NoReturn:
    raise ProtocolError(f"expected a UTC timestamp like 2025-01-31T12:00:00Z, got {text!r}")


# --- strict field reader ----------------------------------------------------

_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")  # "linux/arm64", "linux/arm/v7"
_VALUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,63}")


def _describe(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), "?")


class _Fields:
    """Reads one JSON object: typed getters, the path in every error, no unknown keys."""

    def __init__(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise ProtocolError(f"{path}: expected an object, got {_describe(value)}")
        self._data: dict[str, Any] = value
        self._path = path
        self._used: set[str] = set()

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ProtocolError(f"{self._path}.{key}: {problem}")

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str) -> Any:
        if key not in self._data:
            raise ProtocolError(f"{self._path}: missing field {key!r}")
        self._used.add(key)
        return self._data[key]

    def text(self, key: str, pattern: re.Pattern[str] | None = None, max_len: int = 128) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_describe(value)}")
        if not value or len(value) > max_len:
            self.fail(key, f"expected 1-{max_len} characters, got {len(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(key, f"{value!r} does not match {pattern.pattern}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(key, "not valid Unicode text")
        return value

    def name(self, key: str, grammar: names.Grammar) -> str:
        """A field holding a name of GRAMMAR: the same rule the hub checked it with."""
        value = self.text(key, max_len=grammar.max_len)
        if not grammar.matches(value):
            self.fail(key, f"{value!r} does not match {grammar.pattern.pattern} ({grammar.rule})")
        return value

    def text_or_null(self, key: str, max_len: int = 128) -> str | None:
        return None if self.raw(key) is None else self.text(key, max_len=max_len)

    def integer(self, key: str, low: int = 0, high: int = _MAX_INT) -> int:
        value = self.raw(key)
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            self.fail(key, f"{value} is outside {low}..{high}")
        return value

    def integer_or_null(self, key: str) -> int | None:
        return None if self.raw(key) is None else self.integer(key)

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def time(self, key: str) -> datetime:
        try:
            return parse_time(self.raw(key))
        except ProtocolError as exc:
            self.fail(key, str(exc))

    def obj(self, key: str) -> _Fields:
        return _Fields(self.raw(key), self.path(key))

    def path(self, key: str) -> str:
        return f"{self._path}.{key}"

    def items(self, key: str, max_items: int) -> Iterator[tuple[str, Any]]:
        value = self.raw(key)
        if not isinstance(value, list):
            self.fail(key, f"expected a list, got {_describe(value)}")
        if len(value) > max_items:
            self.fail(key, f"{len(value)} entries; the limit is {max_items}")
        return ((f"{self._path}.{key}[{i}]", item) for i, item in enumerate(value))

    def strings(self, key: str, pattern: re.Pattern[str], max_items: int = 32) -> tuple[str, ...]:
        result = []
        for path, item in self.items(key, max_items):
            if not isinstance(item, str) or not pattern.fullmatch(item):
                raise ProtocolError(f"{path}: {item!r} does not match {pattern.pattern}")
            result.append(item)
        return tuple(result)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._used)
        if unknown:
            raise ProtocolError(f"{self._path}: unknown field(s) {', '.join(map(repr, unknown))}")


def _schema(fields: _Fields, expected: str) -> None:
    schema = fields.raw("schema")
    if schema != expected:
        raise ProtocolError(f"schema is {schema!r}; expected {expected!r}")


# --- desired state ----------------------------------------------------------

DESIRED_SCHEMA: Final = "edgefleet.desired/v1"


@dataclass(frozen=True)
class Package:
    repository: str     # OCI repository in the hub's registry, e.g. "models/diabetes"
    digest: str         # the image index digest the agent must get, "sha256:..."
    size: int           # bytes of the image index, as the registry serves it


@dataclass(frozen=True)
class RuntimeSpec:
    prefer: tuple[str, ...] = ()   # "runtime:DEVICE", best first; empty means "any, on CPU"


@dataclass(frozen=True)
class Candidate:
    """A second version of a deployment, for an A/B split or in shadow.

    Split (shadow false): the candidate answers `traffic` percent of requests,
    the deployment's own version the rest. Shadow: the deployment's version
    answers every request and a copy of `traffic` percent goes to the
    candidate, whose answers only feed telemetry.
    """

    version: int
    package: Package
    runtime: RuntimeSpec
    traffic: int
    shadow: bool = False
    rollout: str | None = None
    # The candidate version's drift sketch bins (contract/sketch.py), if it has a baseline.
    sketch: SketchSpec | None = None


@dataclass(frozen=True)
class Deployment:
    name: str
    model: str
    version: int
    package: Package
    runtime: RuntimeSpec = RuntimeSpec()
    # Percent of requests this version answers: 100, or 100 minus a split
    # candidate's share. Redundant on purpose: a mismatch is refused.
    traffic: int = 100
    rollout: str | None = None
    candidate: Candidate | None = None
    # Resources and batching for every version of it (contract/settings.py); left out of
    # the document when it says nothing, so states from before settings read the same.
    settings: Settings = Settings()
    # The version's drift sketch bins (contract/sketch.py), if it has a baseline.
    sketch: SketchSpec | None = None


@dataclass(frozen=True)
class DesiredState:
    device_id: str
    generation: int         # grows with every change for this device; never reused
    issued_at: datetime
    expires_at: datetime
    deployments: tuple[Deployment, ...]


def _package_json(p: Package) -> dict[str, Any]:
    return {"repository": p.repository, "digest": p.digest, "size": p.size}


def _version_json(version: int, package: Package, runtime: RuntimeSpec, traffic: int,
                  rollout: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"version": version, "package": _package_json(package),
                            "runtime": {"prefer": list(runtime.prefer)}, "traffic": traffic}
    if rollout is not None:
        body["rollout"] = rollout
    return body


def _desired_json(state: DesiredState) -> dict[str, Any]:
    deployments = []
    for d in state.deployments:
        body = {"name": d.name, "model": d.model,
                **_version_json(d.version, d.package, d.runtime, d.traffic, d.rollout)}
        if (c := d.candidate) is not None:
            body["candidate"] = {**_version_json(c.version, c.package, c.runtime, c.traffic,
                                                 c.rollout), "shadow": c.shadow}
            if c.sketch is not None:
                body["candidate"]["sketch"] = c.sketch.to_json()
        if settings := d.settings.to_json():
            body["settings"] = settings
        if d.sketch is not None:
            body["sketch"] = d.sketch.to_json()
        deployments.append(body)
    return {
        "schema": DESIRED_SCHEMA,
        "device_id": state.device_id,
        "generation": state.generation,
        "issued_at": format_time(state.issued_at),
        "expires_at": format_time(state.expires_at),
        "deployments": deployments,
    }


def _read_package(f: _Fields) -> Package:
    p = Package(repository=f.name("repository", names.REPOSITORY),
                digest=f.name("digest", names.DIGEST), size=f.integer("size", low=1))
    f.done()
    return p


def _read_runtime(f: _Fields) -> RuntimeSpec:
    spec = RuntimeSpec(prefer=f.strings("prefer", names.RUNTIME_CHOICE.pattern))
    f.done()
    return spec


def _read_candidate(f: _Fields) -> Candidate:
    c = Candidate(
        version=f.integer("version", low=1),
        package=_read_package(f.obj("package")),
        runtime=_read_runtime(f.obj("runtime")),
        traffic=f.integer("traffic", low=1, high=100),
        shadow=f.flag("shadow"),
        rollout=f.text("rollout") if f.has("rollout") else None,
        sketch=_read_sketch_spec(f) if f.has("sketch") else None,
    )
    f.done()
    return c


def _read_settings(f: _Fields) -> Settings:
    try:
        settings = Settings.from_json(f.raw("settings"))
    except SettingsError as exc:
        f.fail("settings", str(exc))
    if not settings.to_json():
        f.fail("settings", "is empty: leave it out instead")
    return settings


def _read_sketch_spec(f: _Fields) -> SketchSpec:
    try:
        return SketchSpec.from_json(f.raw("sketch"))
    except SketchError as exc:
        f.fail("sketch", str(exc))


def _read_deployment(f: _Fields) -> Deployment:
    d = Deployment(
        name=f.name("name", names.MODEL_NAME),
        model=f.name("model", names.MODEL_NAME),
        version=f.integer("version", low=1),
        package=_read_package(f.obj("package")),
        runtime=_read_runtime(f.obj("runtime")),
        traffic=f.integer("traffic", high=100),
        rollout=f.text("rollout") if f.has("rollout") else None,
        candidate=_read_candidate(f.obj("candidate")) if f.has("candidate") else None,
        settings=_read_settings(f) if f.has("settings") else Settings(),
        sketch=_read_sketch_spec(f) if f.has("sketch") else None,
    )
    f.done()
    c = d.candidate
    primary_share = 100 if c is None or c.shadow else 100 - c.traffic
    if d.traffic != primary_share:
        f.fail("traffic", f"is {d.traffic}; with this candidate it must be {primary_share}")
    if c is not None and c.version == d.version:
        f.fail("candidate.version", f"is the deployment's own version {d.version}")
    if c is not None and not c.shadow and c.traffic == 100:
        f.fail("candidate.traffic", "100 leaves the deployment's version nothing: "
               "make the candidate the deployment's version instead")
    return d


def _read_deployments(f: _Fields) -> tuple[Deployment, ...]:
    deployments = tuple(_read_deployment(_Fields(item, path))
                        for path, item in f.items("deployments", MAX_DEPLOYMENTS))
    names = [d.name for d in deployments]
    if len(set(names)) != len(names):
        f.fail("deployments", f"deployment names repeat: {names}")
    return deployments


def _read_desired(document: object) -> DesiredState:
    f = _Fields(document, "desired")
    _schema(f, DESIRED_SCHEMA)
    deployments = _read_deployments(f)
    state = DesiredState(
        device_id=f.text("device_id", _ID),
        generation=f.integer("generation", low=1),
        issued_at=f.time("issued_at"),
        expires_at=f.time("expires_at"),
        deployments=deployments,
    )
    f.done()
    if state.expires_at <= state.issued_at:
        f.fail("expires_at", "must be later than issued_at")
    return state


@functools.lru_cache(maxsize=64)
def _settings_read_back(deployments: bytes) -> tuple[Settings, ...]:
    """The settings an agent reads from DEPLOYMENTS (canonical JSON of a desired state's
    list); ProtocolError if it would refuse them. Cached: a rollout gives thousands of
    devices the same list, and reading it is half the cost of signing a state."""
    f = _Fields({"deployments": json.loads(deployments)}, "desired")
    return tuple(d.settings for d in _read_deployments(f))


# Outside the signed body: the hub's key rotation statements (contract/keys.py), each
# signed on its own, that lead a device from the key it trusts to the signer's.
KEYS_FIELD: Final = "keys"
_UNSIGNED: Final = ("signature", KEYS_FIELD)


def sign_desired(state: DesiredState, private_key: ec.EllipticCurvePrivateKey,
                 chain: Sequence[dict[str, Any]] = (), *, key_id: str | None = None) -> bytes:
    """The payload to publish (retained) on `desired_topic`: canonical JSON,
    signed over the canonical JSON of the document without "signature" and "keys";
    CHAIN (the hub's rotation statements, if it ever rotated) goes along as "keys".
    KEY_ID: PRIVATE_KEY's `signing.key_id`, if the caller has it (deriving it costs)."""
    from contract import signing  # see _signed_body

    body = _desired_json(state)
    # The hub never signs what an agent would refuse as malformed, or read otherwise:
    # the device's own fields each time, its deployments once per distinct list.
    _read_desired({**body, "deployments": []})
    if list(_settings_read_back(canonical_json(body["deployments"]))) != [
            d.settings for d in state.deployments]:
        raise ProtocolError("a deployment's settings do not read back as built")
    signature = {"keyid": key_id or signing.key_id(private_key), "alg": signing.ALGORITHM,
                 "value": signing.sign(private_key, canonical_json(body))}
    payload = canonical_json({**body, "signature": signature,
                              **({KEYS_FIELD: list(chain)} if chain else {})})
    if len(payload) > MAX_DESIRED_BYTES:
        raise ProtocolError(f"desired state is {len(payload)} bytes; the limit is "
                            f"{MAX_DESIRED_BYTES}")
    return payload


def rotation_chain(payload: bytes) -> object:
    """The key rotation statements a desired state carries ([] if none), unchecked:
    `contract.keys.follow` decides; ProtocolRefusal if PAYLOAD is not a JSON object."""
    return _desired_document(payload).get(KEYS_FIELD, [])


def _desired_document(payload: bytes) -> dict[str, Any]:
    """PAYLOAD read as a JSON object, bounded; else ProtocolRefusal (malformed)."""
    try:
        document = _load(payload, limit=MAX_DESIRED_BYTES, what="desired state")
    except ProtocolError as exc:
        raise ProtocolRefusal(Reason.MALFORMED, str(exc)) from None
    if not isinstance(document, dict):
        raise ProtocolRefusal(Reason.MALFORMED, "desired state is not a JSON object")
    return document


def _signed_body(document: dict[str, Any], public_key: ec.EllipticCurvePublicKey,
                 retired: Collection[str]) -> dict[str, Any]:
    """DOCUMENT without its unsigned fields, if its signature is PUBLIC_KEY's over them;
    else ProtocolRefusal (bad_signature, or retired_key for a key this device retired)."""
    # Here, not at the top: cryptography costs an idle agent 8 MB until it has
    # something to verify.
    from contract import signing

    body = {k: v for k, v in document.items() if k not in _UNSIGNED}
    try:
        sig = _Fields(document.get("signature"), "signature")
        keyid, alg, value = sig.text("keyid"), sig.text("alg"), sig.text("value", max_len=512)
        sig.done()
    except ProtocolError as exc:
        raise ProtocolRefusal(Reason.BAD_SIGNATURE, f"no usable signature: {exc}") from None
    trusted = signing.key_id(public_key)
    if alg != signing.ALGORITHM:
        raise ProtocolRefusal(Reason.BAD_SIGNATURE,
                              f"algorithm {alg!r}; expected {signing.ALGORITHM!r}")
    if keyid != trusted and keyid in retired:
        raise ProtocolRefusal(Reason.RETIRED_KEY, f"signed by key {keyid}, which this device "
                              f"retired when the hub rotated its key; it trusts {trusted}")
    if keyid != trusted:
        raise ProtocolRefusal(Reason.BAD_SIGNATURE,
                              f"signed by key {keyid}, but this device trusts {trusted}")
    try:
        signing.verify(public_key, canonical_json(body), value)
    except (signing.SignatureError, ValueError) as exc:  # ValueError: unencodable text
        raise ProtocolRefusal(Reason.BAD_SIGNATURE, str(exc)) from None
    return body


def verify_desired(
    payload: bytes,
    *,
    public_key: ec.EllipticCurvePublicKey,
    device_id: str,
    last_generation: int,
    now: datetime,
    max_skew: timedelta = CLOCK_SKEW,
    retired: Collection[str] = (),
) -> DesiredState:
    """The desired state in PAYLOAD if this device may apply it; else ProtocolRefusal.

    The signature is checked before anything else in the document is
    believed. LAST_GENERATION is the last one applied (0 before the first).
    RETIRED: ids of hub keys this device rotated away from (refused as such).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    document = _desired_document(payload)
    claimed = document.get("generation")
    generation = claimed if isinstance(claimed, int) and not isinstance(claimed, bool) else None

    def refuse(reason: Reason, message: str) -> NoReturn:
        raise ProtocolRefusal(reason, message, generation=generation)

    try:
        body = _signed_body(document, public_key, retired)
    except ProtocolRefusal as exc:
        refuse(exc.reason, exc.message)

    if document.get("schema") != DESIRED_SCHEMA:
        refuse(Reason.UNSUPPORTED_SCHEMA,
               f"schema {document.get('schema')!r}; this agent reads {DESIRED_SCHEMA!r}")
    try:
        state = _read_desired(body)
    except ProtocolError as exc:
        refuse(Reason.MALFORMED, str(exc))
    if state.device_id != device_id:
        refuse(Reason.WRONG_DEVICE, f"addressed to {state.device_id!r}, not {device_id!r}")
    if state.generation == last_generation:
        refuse(Reason.ALREADY_APPLIED, f"generation {state.generation} is the one applied")
    if state.generation < last_generation:
        refuse(Reason.REPLAY, f"generation {state.generation} is older than the applied "
               f"generation {last_generation}")
    if now >= state.expires_at:
        refuse(Reason.EXPIRED, f"expired at {format_time(state.expires_at)}")
    if state.issued_at > now + max_skew:
        refuse(Reason.NOT_YET_VALID, f"issued at {format_time(state.issued_at)}, later than "
               f"this device's clock ({format_time(now)}) allows")
    return state


# --- commands -----------------------------------------------------------------
#
# A command asks one device to do one thing now (today: profile a model version on
# the device). It travels on the device's commands topic, QoS 1, never retained,
# signed by the hub's key like a desired state. The agent checks the signature first,
# then the device id, that it has not seen the command id before (`replay`: it keeps
# the ids of commands still valid), the expiry and the issue time. A command is valid
# for at most MAX_COMMAND_VALIDITY, so the ids a device must remember are few. The
# answer (`CommandResult`) goes back over HTTPS with the device's token.

COMMAND_SCHEMA: Final = "edgefleet.command/v1"
COMMAND_RESULT_SCHEMA: Final = "edgefleet.command-result/v1"
MAX_COMMAND_BYTES: Final = 8 * 1024
MAX_COMMAND_RESULT_BYTES: Final = 512 * 1024
MAX_COMMAND_VALIDITY: Final = timedelta(hours=1)
MAX_PROFILE_ITERATIONS: Final = 1000  # a device measures; it must not be kept busy for hours
MAX_PROFILE_BATCH: Final = 256
MAX_PROFILE_ROWS: Final = 1000


class CommandKind(StrEnum):
    PROFILE = "profile"


class CommandState(StrEnum):
    """Where a command is: the device says running, done or failed; the hub says the rest."""

    SENT = "sent"          # published to the device's commands topic
    RUNNING = "running"    # the device accepted it and works on it
    DONE = "done"
    FAILED = "failed"      # the device could not do it (its error says why)
    EXPIRED = "expired"    # no answer before it expired (device offline, refused, busy)


@dataclass(frozen=True)
class ProfileArgs:
    model: str
    version: int
    variant: str
    max_batch: int
    iterations: int


@dataclass(frozen=True)
class Command:
    id: str
    device_id: str
    issued_at: datetime
    expires_at: datetime
    kind: CommandKind
    profile: ProfileArgs


def _command_json(c: Command) -> dict[str, Any]:
    p = c.profile
    return {"schema": COMMAND_SCHEMA, "id": c.id, "device_id": c.device_id,
            "issued_at": format_time(c.issued_at), "expires_at": format_time(c.expires_at),
            "kind": str(c.kind),
            "profile": {"model": p.model, "version": p.version, "variant": p.variant,
                        "max_batch": p.max_batch, "iterations": p.iterations}}


def _read_command(document: object) -> Command:
    f = _Fields(document, "command")
    _schema(f, COMMAND_SCHEMA)
    kind = f.text("kind")
    if kind not in CommandKind.__members__.values():
        f.fail("kind", f"{kind!r} is not one of {', '.join(CommandKind)}")
    p = f.obj("profile")
    args = ProfileArgs(model=p.name("model", names.MODEL_NAME),
                       version=p.integer("version", low=1),
                       variant=p.name("variant", names.VARIANT),
                       max_batch=p.integer("max_batch", low=1, high=MAX_PROFILE_BATCH),
                       iterations=p.integer("iterations", low=1, high=MAX_PROFILE_ITERATIONS))
    p.done()
    command = Command(id=f.text("id", _ID), device_id=f.text("device_id", _ID),
                      issued_at=f.time("issued_at"), expires_at=f.time("expires_at"),
                      kind=CommandKind(kind), profile=args)
    f.done()
    if not command.issued_at < command.expires_at <= command.issued_at + MAX_COMMAND_VALIDITY:
        f.fail("expires_at", f"must be after issued_at and within {MAX_COMMAND_VALIDITY} of it")
    return command


def sign_command(command: Command, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The payload to publish (QoS 1, not retained) on `commands_topic`: canonical JSON signed
    as a desired state is. The hub never sends what an agent would read otherwise."""
    from contract import signing  # see _signed_body

    body = _command_json(command)
    if _read_command(body) != command:
        raise ProtocolError("the command does not read back as built")
    signature = {"keyid": signing.key_id(private_key), "alg": signing.ALGORITHM,
                 "value": signing.sign(private_key, canonical_json(body))}
    payload = canonical_json({**body, "signature": signature})
    if len(payload) > MAX_COMMAND_BYTES:
        raise ProtocolError(f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}")
    return payload


def verify_command(payload: bytes, *, public_key: ec.EllipticCurvePublicKey, device_id: str,
                   seen: Collection[str], now: datetime, max_skew: timedelta = CLOCK_SKEW,
                   retired: Collection[str] = ()) -> Command:
    """The command in PAYLOAD if this device may run it; else ProtocolRefusal, whose message
    starts with the command id the document claims (for the device's report). SEEN: the ids
    of commands this device has taken and that are still valid."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    try:
        document = _load(payload, limit=MAX_COMMAND_BYTES, what="command")
    except ProtocolError as exc:
        raise ProtocolRefusal(Reason.MALFORMED, f"command: {exc}") from None
    if not isinstance(document, dict):
        raise ProtocolRefusal(Reason.MALFORMED, "command: not a JSON object")
    claimed = document.get("id")
    label = f"command {claimed!r:.140}"

    def refuse(reason: Reason, message: str) -> NoReturn:
        raise ProtocolRefusal(reason, f"{label}: {message}")

    if KEYS_FIELD in document:
        refuse(Reason.MALFORMED, "commands carry no key rotations")
    try:
        body = _signed_body(document, public_key, retired)
    except ProtocolRefusal as exc:
        refuse(exc.reason, exc.message)
    if document.get("schema") != COMMAND_SCHEMA:
        refuse(Reason.UNSUPPORTED_SCHEMA,
               f"schema {document.get('schema')!r:.80}; this agent reads {COMMAND_SCHEMA!r}")
    try:
        command = _read_command(body)
    except ProtocolError as exc:
        refuse(Reason.MALFORMED, str(exc))
    if command.device_id != device_id:
        refuse(Reason.WRONG_DEVICE, f"addressed to {command.device_id!r}, not {device_id!r}")
    if command.id in seen:
        refuse(Reason.REPLAY, "this device has taken this command already")
    if now >= command.expires_at:
        refuse(Reason.EXPIRED, f"expired at {format_time(command.expires_at)}")
    if command.issued_at > now + max_skew:
        refuse(Reason.NOT_YET_VALID, f"issued at {format_time(command.issued_at)}, later than "
               f"this device's clock ({format_time(now)}) allows")
    return command


@dataclass(frozen=True)
class CommandResult:
    """A device's answer to a command: running (taken), then done (ROWS) or failed (ERROR).
    A profile's rows have the fields of contract/profiles.py, checked for shape here and
    for their values by the hub."""

    command_id: str
    device_id: str
    state: CommandState
    error: str | None = None
    rows: tuple[Mapping[str, Value], ...] = ()


_ROW_TEXT: Final = ("device_class", "runtime", "device", "variant")
_ROW_INTEGERS: Final = ("batch", "iterations", "peak_rss_bytes")
_ROW_NUMBERS: Final = ("p50_ms", "p99_ms", "throughput")


def _read_profile_row(f: _Fields) -> dict[str, Value]:
    row: dict[str, Value] = {key: f.text(key, max_len=64) for key in _ROW_TEXT}
    row |= {key: f.integer(key) for key in _ROW_INTEGERS}
    for key in _ROW_NUMBERS:
        value = f.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            f.fail(key, f"expected a number of at least 0, got {_describe(value)}")
        row[key] = float(value)
    f.done()
    return row


def read_command_result(document: object, *, device_id: str) -> CommandResult:
    """The result in DOCUMENT (already JSON-decoded) from DEVICE_ID; ProtocolError if it
    breaks the protocol."""
    f = _Fields(document, "result")
    _schema(f, COMMAND_RESULT_SCHEMA)
    state = f.text("state")
    if state not in (CommandState.RUNNING, CommandState.DONE, CommandState.FAILED):
        f.fail("state", f"{state!r} is not running, done or failed")
    result = CommandResult(
        command_id=f.text("command_id", _ID), device_id=f.text("device_id", _ID),
        state=CommandState(state), error=f.text_or_null("error", max_len=MAX_TEXT),
        rows=tuple(_read_profile_row(_Fields(item, path))
                   for path, item in f.items("rows", MAX_PROFILE_ROWS)))
    f.done()
    if result.device_id != device_id:
        f.fail("device_id", f"is {result.device_id!r}, but it came from device {device_id!r}")
    if (result.state is CommandState.FAILED) != (result.error is not None):
        f.fail("error", "a failed command has an error, and only a failed one")
    if (result.state is CommandState.DONE) != bool(result.rows):
        f.fail("rows", "a done command has rows, and only a done one")
    return result


def build_command_result(result: CommandResult) -> bytes:
    body = {"schema": COMMAND_RESULT_SCHEMA, "command_id": result.command_id,
            "device_id": result.device_id, "state": str(result.state), "error": result.error,
            "rows": [dict(row) for row in result.rows]}
    payload = canonical_json(body)
    if len(payload) > MAX_COMMAND_RESULT_BYTES:
        raise ProtocolError(f"command result is {len(payload)} bytes; the limit is "
                            f"{MAX_COMMAND_RESULT_BYTES}")
    read_command_result(body, device_id=result.device_id)  # never send what the hub refuses
    return payload


def parse_command_result(payload: bytes, *, device_id: str) -> CommandResult:
    return read_command_result(
        _load(payload, limit=MAX_COMMAND_RESULT_BYTES, what="command result"),
        device_id=device_id)


# --- reported state ---------------------------------------------------------

REPORTED_SCHEMA: Final = "edgefleet.reported/v1"


class UpdateState(StrEnum):
    """Where a deployment's version is in the agent's update; see agent docs."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    STARTING = "starting"
    SELF_TEST = "self_test"
    SERVING = "serving"
    FAILED = "failed"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class DeploymentStatus:
    """One version on the device; a deployment with a candidate has two."""

    name: str
    model: str
    version: int
    state: UpdateState
    since: datetime              # when it entered this state
    error: str | None = None
    runtime: str | None = None   # e.g. "onnxruntime", once loaded
    device: str | None = None    # what it really runs on, e.g. "CPU", "GPU.0"


@dataclass(frozen=True)
class Refusal:
    generation: int | None
    reason: Reason
    message: str
    at: datetime


@dataclass(frozen=True)
class ReportedState:
    device_id: str
    applied_generation: int      # 0 until a desired state has been applied
    deployments: tuple[DeploymentStatus, ...]
    platform: str                # "linux/arm64"
    accelerators: tuple[str, ...]  # "runtime:DEVICE" entries the device has
    agent_version: str
    refusals: tuple[Refusal, ...] = ()  # most recent last, at most MAX_REFUSALS
    # Facts for the hub's device record and targeting: cpu_model, cpu_count,
    # memory_mb, disk_mb, <runtime>_version ... (numbers and short strings).
    inventory: Mapping[str, Value] = field(default_factory=dict)


def build_reported(state: ReportedState) -> bytes:
    body = {
        "schema": REPORTED_SCHEMA,
        "device_id": state.device_id,
        "applied_generation": state.applied_generation,
        "deployments": [
            {"name": d.name, "model": d.model, "version": d.version, "state": str(d.state),
             "since": format_time(d.since), "error": d.error, "runtime": d.runtime,
             "device": d.device}
            for d in state.deployments
        ],
        "platform": state.platform,
        "accelerators": list(state.accelerators),
        "agent_version": state.agent_version,
        "inventory": dict(state.inventory),
        "refusals": [
            {"generation": r.generation, "reason": str(r.reason), "message": r.message,
             "at": format_time(r.at)}
            for r in state.refusals
        ],
    }
    payload = canonical_json(body)
    parse_reported(payload, device_id=state.device_id)  # never send what the hub refuses
    return payload


def _read_deployment_status(f: _Fields) -> DeploymentStatus:
    state = f.text("state")
    if state not in UpdateState.__members__.values():
        f.fail("state", f"{state!r} is not one of {', '.join(UpdateState)}")
    d = DeploymentStatus(
        name=f.name("name", names.MODEL_NAME),
        model=f.name("model", names.MODEL_NAME),
        version=f.integer("version", low=1),
        state=UpdateState(state),
        since=f.time("since"),
        error=f.text_or_null("error", max_len=MAX_TEXT),
        runtime=f.text_or_null("runtime"),
        device=f.text_or_null("device"),
    )
    f.done()
    return d


def _read_refusal(f: _Fields) -> Refusal:
    reason = f.text("reason")
    if reason not in Reason.__members__.values():
        f.fail("reason", f"{reason!r} is not one of {', '.join(Reason)}")
    r = Refusal(generation=f.integer_or_null("generation"), reason=Reason(reason),
                message=f.text("message", max_len=MAX_TEXT), at=f.time("at"))
    f.done()
    return r


def parse_reported(payload: bytes, *, device_id: str) -> ReportedState:
    """The reported state DEVICE_ID (from the topic) sent; ProtocolError if malformed."""
    f = _Fields(_load(payload, limit=MAX_REPORTED_BYTES, what="reported state"), "reported")
    _schema(f, REPORTED_SCHEMA)
    state = ReportedState(
        device_id=f.text("device_id", _ID),
        applied_generation=f.integer("applied_generation"),
        deployments=tuple(_read_deployment_status(_Fields(item, path))
                          for path, item in f.items("deployments", 2 * MAX_DEPLOYMENTS)),
        platform=f.text("platform", _PLATFORM, max_len=64),
        accelerators=f.strings("accelerators", names.RUNTIME_CHOICE.pattern),
        agent_version=f.text("agent_version", max_len=64),
        inventory=_read_values(f.path("inventory"), f.raw("inventory")),
        refusals=tuple(_read_refusal(_Fields(item, path))
                       for path, item in f.items("refusals", MAX_REFUSALS)),
    )
    f.done()
    if state.device_id != device_id:
        f.fail("device_id", f"is {state.device_id!r}, but it came from device {device_id!r}")
    keys = [(d.name, d.version) for d in state.deployments]
    if len(set(keys)) != len(keys):
        f.fail("deployments", "the same deployment version is listed twice")
    return state


# --- telemetry ----------------------------------------------------------------

TELEMETRY_SCHEMA: Final = "edgefleet.telemetry/v1"
PointKind = Literal["system", "inference"]
Value = int | float | str


@dataclass(frozen=True)
class Point:
    seq: int                     # per device, strictly increasing, never reused
    at: datetime
    kind: PointKind
    values: Mapping[str, Value]  # numbers, plus short strings such as a deployment name
    # Inference points only: drift sketches, feature name -> counts (contract/sketch.py).
    # Read here for their outer shape only; the hub reads each with read_counts so
    # that a bad one is dropped alone.
    sketches: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TelemetryBatch:
    """Points in sequence order. The hub stores a point only if it has not
    seen (device_id, seq) before, so a batch resent after a reconnect is
    harmless; gaps in seq are points the agent's bounded queue dropped."""

    device_id: str
    points: tuple[Point, ...]

    @property
    def seq_from(self) -> int:
        return self.points[0].seq

    @property
    def seq_to(self) -> int:
        return self.points[-1].seq


def build_telemetry(batch: TelemetryBatch) -> bytes:
    if not batch.points:
        raise ProtocolError("a telemetry batch needs at least one point")
    payload = canonical_json({
        "schema": TELEMETRY_SCHEMA,
        "device_id": batch.device_id,
        "seq_from": batch.seq_from,
        "seq_to": batch.seq_to,
        "points": [_point_json(p) for p in batch.points],
    })
    try:
        for point in batch.points:
            for name, counts in point.sketches.items():
                read_counts(name, counts)
    except SketchError as exc:
        raise ProtocolError(str(exc)) from None
    # Same rules on both sides; an over-large batch is for the caller to split.
    parse_telemetry(payload, device_id=batch.device_id)
    return payload


def _point_json(p: Point) -> dict[str, Any]:
    body = {"seq": p.seq, "at": format_time(p.at), "kind": p.kind, "values": dict(p.values)}
    if p.sketches:
        body["sketches"] = {name: list(counts) for name, counts in p.sketches.items()}
    return body


# Value names that matched _VALUE_NAME (at most 64 characters each): a fleet sends the
# same few in every point, so most points' names are checked by one subset test.
_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES: Final = 4096


def _read_values(path: str, value: object) -> dict[str, Value]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{path}: expected an object, got {_describe(value)}")
    if len(value) > MAX_VALUES_PER_POINT:
        raise ProtocolError(f"{path}: {len(value)} values; the limit is {MAX_VALUES_PER_POINT}")
    if value.keys() <= _GOOD_NAMES:
        for item in value.values():
            kind = type(item)  # exact types: what JSON gives; anything else, the loop below
            if not ((kind is int or kind is float) and -_MAX_INT <= item <= _MAX_INT
                    or kind is str and len(item) <= 128):
                break
        else:
            return value
    return _read_values_one_by_one(path, value)


def _read_values_one_by_one(path: str, value: dict[str, Any]) -> dict[str, Value]:
    for name, item in value.items():
        if name not in _GOOD_NAMES:
            if len(name) > 64 or not _VALUE_NAME.fullmatch(name):
                raise ProtocolError(
                    f"{path}: value name {name!r} does not match {_VALUE_NAME.pattern}")
            if len(_GOOD_NAMES) < _MAX_GOOD_NAMES:
                _GOOD_NAMES.add(name)
        kind = type(item)  # exact types first: what JSON gives, and cheaper than isinstance
        ok = ((kind is int or kind is float) and -_MAX_INT <= item <= _MAX_INT) or (
            kind is str and len(item) <= 128) or (
            isinstance(item, int | float) and not isinstance(item, bool)
            and abs(item) <= _MAX_INT) or (isinstance(item, str) and len(item) <= 128)
        if not ok:
            raise ProtocolError(f"{path}.{name}: expected a number or a string of at most "
                                f"128 characters, got {_describe(item)}")
    return value


_POINT_FIELDS: Final = frozenset(("seq", "at", "kind", "values"))
_SKETCHED_POINT_FIELDS: Final = _POINT_FIELDS | {"sketches"}


def _read_point(path: str, item: object) -> Point:
    """One point. The common, well-formed point is read without _Fields' bookkeeping
    (the hub reads thousands a second); anything else, or anything this finds
    wrong, goes through `_read_point_fields`, which accepts the same and says what
    is wrong."""
    if type(item) is dict and item.keys() in (_POINT_FIELDS, _SKETCHED_POINT_FIELDS):
        seq, kind, sketched = item["seq"], item["kind"], "sketches" in item
        if type(seq) is int and 0 <= seq <= _MAX_INT and (
                kind == "inference" or kind == "system" and not sketched):
            try:  # not contextlib.suppress: a context manager a point costs ~0.5 us
                return Point(seq=seq, at=parse_time(item["at"]), kind=kind,
                             values=_read_values(f"{path}.values", item["values"]),
                             sketches=check_sketches(item["sketches"]) if sketched else {})
            except (ProtocolError, SketchError):
                pass
    return _read_point_fields(_Fields(item, path))


def _read_point_fields(f: _Fields) -> Point:
    kind = f.text("kind")
    if kind not in ("system", "inference"):
        f.fail("kind", f"{kind!r} is not 'system' or 'inference'")
    sketches: Mapping[str, Any] = {}
    if f.has("sketches"):
        if kind != "inference":
            f.fail("sketches", "only inference points carry sketches")
        try:
            sketches = check_sketches(f.raw("sketches"))
        except SketchError as exc:
            f.fail("sketches", str(exc))
    point = Point(seq=f.integer("seq"), at=f.time("at"), kind=cast(PointKind, kind),
                  values=_read_values(f.path("values"), f.raw("values")), sketches=sketches)
    f.done()
    return point


def parse_telemetry(payload: bytes, *, device_id: str,
                    fast: FastJson | None = None) -> TelemetryBatch:
    """The telemetry batch DEVICE_ID (from the topic) sent; ProtocolError if malformed.
    FAST: decode with that codec (`_load_canonical`: the hub's ingest passes orjson),
    same result."""
    if fast is None:
        document = _load(payload, limit=MAX_TELEMETRY_BYTES, what="telemetry batch",
                         decoder=_TELEMETRY)
    else:
        document = _load_canonical(payload, limit=MAX_TELEMETRY_BYTES, what="telemetry batch",
                                   decoder=_TELEMETRY, fast=fast)
    return _read_batch(document, device_id) or _read_batch_fields(document, device_id)


_BATCH_FIELDS: Final = frozenset(("schema", "device_id", "seq_from", "seq_to", "points"))


def _read_batch(document: object, device_id: str) -> TelemetryBatch | None:
    """The common, well-formed batch, read without _Fields' bookkeeping (like
    `_read_point`); None for anything else, which `_read_batch_fields` reads or
    refuses. A point's error is raised here: the fields before it are right, so
    `_read_batch_fields` would raise the same."""
    if not (type(document) is dict and document.keys() == _BATCH_FIELDS
            and document["schema"] == TELEMETRY_SCHEMA and document["device_id"] == device_id
            and type(device_id) is str and _ID.fullmatch(device_id)):
        return None
    items, seq_from, seq_to = document["points"], document["seq_from"], document["seq_to"]
    if not (type(items) is list and 0 < len(items) <= MAX_TELEMETRY_POINTS
            and type(seq_from) is int and type(seq_to) is int):
        return None
    points = tuple(_read_point(f"telemetry.points[{i}]", item) for i, item in enumerate(items))
    if (seq_from, seq_to) != (points[0].seq, points[-1].seq) or any(
            a.seq >= b.seq for a, b in pairwise(points)):
        return None
    return TelemetryBatch(device_id=device_id, points=points)


def _read_batch_fields(document: object, device_id: str) -> TelemetryBatch:
    f = _Fields(document, "telemetry")
    _schema(f, TELEMETRY_SCHEMA)
    batch = TelemetryBatch(
        device_id=f.text("device_id", _ID),
        points=tuple(_read_point(path, item)
                     for path, item in f.items("points", MAX_TELEMETRY_POINTS)),
    )
    seq_from, seq_to = f.integer("seq_from"), f.integer("seq_to")
    f.done()
    if batch.device_id != device_id:
        f.fail("device_id", f"is {batch.device_id!r}, but it came from device {device_id!r}")
    if not batch.points:
        f.fail("points", "a batch needs at least one point")
    if any(a.seq >= b.seq for a, b in pairwise(batch.points)):
        f.fail("points", "seq must increase strictly from point to point")
    if (seq_from, seq_to) != (batch.seq_from, batch.seq_to):
        f.fail("seq_from", f"{seq_from}..{seq_to} does not match the points "
               f"({batch.seq_from}..{batch.seq_to})")
    return batch


# --- status -------------------------------------------------------------------

ONLINE: Final = b"online"     # the birth message, retained
OFFLINE: Final = b"offline"   # the last will, retained; also sent on a clean stop


def parse_status(payload: bytes) -> Literal["online", "offline"]:
    if payload == ONLINE:
        return "online"
    if payload == OFFLINE:
        return "offline"
    raise ProtocolError(f"status payload {bytes(payload[:32])!r} is not b'online' or b'offline'")
