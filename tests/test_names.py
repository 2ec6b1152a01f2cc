"""The name grammars (contract/names.py): what the hub accepts, the protocol and the agent
accept too, and hostile names are refused at the hub's API before anything is stored."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract import names, oci, protocol, signing
from contract.errors import FormatError, PackageError
from hub import validation
from hub.oci_registry import RegistryError, check_reference, check_repo
from hub.storage.blobs import BlobError, check_digest
from packager.tarball import check_relative_path

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = signing.generate_private_key()
DIGEST = "sha256:" + "a" * 64
HOSTILE = ["diabetes\n", "../x", "a\x00b", "x" * 65, "", "diabetes\r", " diabetes", "Diabetes"]


def texts_near(
    grammar: names.Grammar, valid: st.SearchStrategy[str] | None = None
) -> st.SearchStrategy[str]:
    """Valid names, arbitrary text, and valid names with a hostile character added."""
    if valid is None:
        valid = st.from_regex(grammar.pattern, fullmatch=True)
    junk = st.sampled_from(["\n", "\x00", "/", "..", " ", "\t", ":", "\\", "\u00e9", "A", "-"])
    edited = st.tuples(valid, junk, st.booleans()).map(
        lambda t: t[1] + t[0] if t[2] else t[0] + t[1])
    return st.one_of(valid, edited, st.text(max_size=80), st.sampled_from(HOSTILE))


def accepts(check: object, *args: object, errors: tuple[type[Exception], ...]) -> bool:
    try:
        check(*args)  # type: ignore[operator]
    except errors:
        return False
    return True


def agent_accepts_deployment(name: str, repository: str, digest: str) -> bool:
    """Does an agent apply a desired state naming these? The hub's builder refuses to sign
    what the agent would refuse, so either refusal counts."""
    package = protocol.Package(repository=repository, digest=digest, size=10)
    state = protocol.DesiredState(
        device_id="dev-1", generation=1, issued_at=NOW, expires_at=NOW + timedelta(days=1),
        deployments=(protocol.Deployment(name=name, model=name, version=1, package=package),))
    try:
        payload = protocol.sign_desired(state, KEY)
        got = protocol.verify_desired(payload, public_key=KEY.public_key(), device_id="dev-1",
                                      last_generation=0, now=NOW)
    except protocol.ProtocolError:
        return False
    assert got.deployments[0].package == package and got.deployments[0].model == name
    return True


def agent_reports(name: str) -> bool:
    status = protocol.DeploymentStatus(name=name, model=name, version=1,
                                       state=protocol.UpdateState.SERVING, since=NOW)
    report = protocol.ReportedState(device_id="dev-1", applied_generation=1,
                                    deployments=(status,), platform="linux/arm64",
                                    accelerators=(), agent_version="1")
    try:
        protocol.parse_reported(protocol.build_reported(report), device_id="dev-1")
    except protocol.ProtocolError:
        return False
    return True


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(texts_near(names.MODEL_NAME))
def test_a_model_name_the_hub_accepts_is_one_the_protocol_and_agent_accept(name: str) -> None:
    hub_ok = accepts(validation.model_name, name, errors=(validation.InvalidName,))
    # The hub's packages live in models/<name> of its registry.
    registry_ok = hub_ok and accepts(check_repo, f"models/{name}", errors=(RegistryError,))
    assert hub_ok == registry_ok
    assert agent_accepts_deployment(name, f"models/{name}", DIGEST) == hub_ok
    assert agent_reports(name) == hub_ok


# Generating from the whole repository pattern is slow; a few components of it are not.
_COMPONENT = st.from_regex(r"[a-z0-9]{1,3}(?:(?:\.|_|__|-+)[a-z0-9]{1,3}){0,2}", fullmatch=True)
REPOSITORIES = st.lists(_COMPONENT, min_size=1, max_size=3).map("/".join)


@PROPERTY
@given(texts_near(names.REPOSITORY, REPOSITORIES))
def test_a_repository_the_hub_registry_accepts_is_one_the_protocol_accepts(repo: str) -> None:
    hub_ok = accepts(check_repo, repo, errors=(RegistryError,))
    assert agent_accepts_deployment("m", repo, DIGEST) == hub_ok


@PROPERTY
@given(texts_near(names.DIGEST))
def test_a_digest_is_the_same_to_the_hub_the_protocol_and_the_oci_reader(digest: str) -> None:
    hub_ok = accepts(check_digest, digest, errors=(BlobError,))
    assert accepts(oci.check_digest, digest, errors=(FormatError,)) == hub_ok
    assert agent_accepts_deployment("m", "models/m", digest) == hub_ok


@PROPERTY
@given(texts_near(names.OCI_TAG))
def test_a_tag_the_hub_registry_accepts_is_an_oci_tag(tag: str) -> None:
    hub_ok = accepts(check_reference, tag, errors=(RegistryError,))
    assert names.OCI_TAG.matches(tag) == hub_ok


@PROPERTY
@given(texts_near(names.FILE_PATH))
def test_a_file_name_the_hub_accepts_is_one_a_package_can_carry(path: str) -> None:
    hub_ok = accepts(validation.file_path, path, errors=(validation.InvalidName,))
    if len(path) <= names.FILE_PATH.max_len:
        assert accepts(check_relative_path, path, errors=(PackageError,)) == hub_ok


@pytest.mark.parametrize("grammar", [g for g in vars(names).values()
                                     if isinstance(g, names.Grammar)])
def test_no_grammar_lets_a_trailing_newline_through(grammar: names.Grammar) -> None:
    example = {"tag value": "v", "digest": DIGEST,
               "accelerator preference": "onnxruntime:CPU"}.get(grammar.what, "a")
    assert grammar.matches(example)
    assert not grammar.matches(example + "\n")


ONE_LINE_CASES = [(names.model_name, (name,)) for name in HOSTILE] + [
    (names.file_path, ("../x",)), (names.file_path, ("a\nb",)), (names.file_path, ("a\x00b",)),
    (names.file_path, ("x" * 256,)), (names.repository, ("models/x\n",)),
    (names.oci_tag, ("v1\n",)), (names.digest, (DIGEST + "\n",)), (names.tag, ("k\n", "v")),
    (names.tag, ("k", "v\n")),
]


@pytest.mark.parametrize(("check", "args"), ONE_LINE_CASES)
def test_refusals_are_one_line(check: Callable[..., object], args: tuple[str, ...]) -> None:
    with pytest.raises(names.InvalidName) as caught:
        check(*args)
    assert "\n" not in str(caught.value) and "\x00" not in str(caught.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("diabetes:2", ("diabetes", 2)), ("diabetes", ("diabetes", None)),
    ("diabetes:latest", ("diabetes", None)), (" diabetes:3 ", ("diabetes", 3)),
])
def test_model_references(text: str, expected: tuple[str, int | None]) -> None:
    assert names.model_ref(text) == expected


@pytest.mark.parametrize("text", ["diabetes:0", "diabetes:x", "a:b:1", ":2", "Bad:1",
                                  "diabetes\n:1", "diabetes:2\x00"])
def test_bad_model_references_are_refused(text: str) -> None:
    with pytest.raises(names.InvalidName, match="MODEL:VERSION|invalid model name"):
        names.model_ref(text)


def test_a_version_reference_needs_its_number() -> None:
    assert names.model_version("diabetes:3") == ("diabetes", 3)
    with pytest.raises(names.InvalidName, match="with a version number"):
        names.model_version("diabetes:latest")


def test_comma_lists_and_durations() -> None:
    assert names.comma_list(" a, b,,c ,") == ["a", "b", "c"]
    assert names.comma_list(None) == [] and names.comma_list("") == []
    assert names.duration("30s") == 30 and names.duration("7d") == 7 * 86400
    for bad in ["30", "1w", "s", "10 m", "-1s", "1.5h"]:
        with pytest.raises(names.InvalidName, match="should look like 30s"):
            names.duration(bad, "--expires")


# ---- through a real hub ------------------------------------------------------------


def snapshot(api: httpx.Client) -> list:
    models = api.get("/api/v1/models").json()
    return [models] + [api.get(f"/api/v1/models/{m['name']}/versions").json() for m in models]


def refused(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "\n" not in detail and "\x00" not in detail
    return detail


@pytest.mark.parametrize("name", ["diabetes\n", "diabetes\x00", "diabetes\r", "x" * 65,
                                  "x" * 5000, "Diabetes", "dia betes", ".x", "x\u00e9"])
def test_the_hub_refuses_hostile_model_names_before_storing_anything(
        api: httpx.Client, name: str) -> None:
    digest = api.post("/api/v1/blobs", content=b"some bytes").json()["digest"]
    before = snapshot(api)
    response = api.post(f"/api/v1/models/{urllib.parse.quote(name, safe='')}/versions",
                        json={"files": [{"path": "notes.txt", "digest": digest}]})
    refused(response)
    assert snapshot(api) == before


@pytest.mark.parametrize("path", ["../x", "a/../x", "/x", "a\x00b", "a\nb", "a\\b", "x" * 256,
                                  "a//b", "./a"])
def test_the_hub_refuses_hostile_file_names(api: httpx.Client, path: str) -> None:
    digest = api.post("/api/v1/blobs", content=b"some bytes").json()["digest"]
    before = snapshot(api)
    detail = refused(api.post("/api/v1/models/hostile/versions",
                              json={"files": [{"path": path, "digest": digest}]}))
    assert "file name" in detail
    assert snapshot(api) == before


@pytest.mark.parametrize("tags", [{"../x": "v"}, {"k\n": "v"}, {"k": "v\n"}, {"k": "v\x00"},
                                  {"k" * 65: "v"}, {"k": "v" * 257}])
def test_the_hub_refuses_hostile_tags(api: httpx.Client, tags: dict[str, str]) -> None:
    digest = api.post("/api/v1/blobs", content=b"some bytes").json()["digest"]
    before = snapshot(api)
    refused(api.post("/api/v1/models/hostile/versions",
                     json={"files": [{"path": "notes.txt", "digest": digest}], "tags": tags}))
    assert snapshot(api) == before
