"""Signing a package cosign-style and verifying it: each kind of tampering is caught and named."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from contract.cosign import SIGNATURE_ANNOTATION, SIMPLE_SIGNING, sign_package, signature_tag
from contract.errors import BlobNotFound, PackageError, RefNotFound, VerificationError
from contract.oci import INDEX, REF_NAME, Descriptor, OCILayout, canonical_json
from contract.signing import generate_keypair, key_id, load_private_key, load_public_key
from contract.verify import VerifiedPackage, verify_contents, verify_package
from packager.build import BuildResult
from packager_fixtures import VERSION, FakeDeps, build, model_files, needs_skopeo, skopeo

REPOSITORY = "models/diabetes"
TAG = str(VERSION)


class Package:
    """A built and signed package in a layout, and the keys around it."""

    def __init__(self, root: Path) -> None:
        self.result: BuildResult = build(
            root / "layout", model_files(root / "model"), deps=FakeDeps(root / "deps")
        )
        self.layout = OCILayout(root / "layout")
        private, public = generate_keypair(root / "keys")
        self.key = load_private_key(private)
        self.public = load_public_key(public.read_bytes())
        self.other = ec.generate_private_key(ec.SECP256R1())
        sign_package(self.layout, self.result.digest, self.key, REPOSITORY)

    def verify(self, **options: Any) -> VerifiedPackage:
        return verify_package(
            self.layout, self.result.index, public_key=self.public, repository=REPOSITORY, **options
        )

    def manifest(self, platform: str) -> dict:
        return json.loads(self.layout.get(self.result.manifests[platform].digest))

    def flip_byte(self, digest: str, offset: int = 700) -> None:
        path = self.layout.blob_path(digest)
        data = bytearray(path.read_bytes())
        data[offset % len(data)] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.fixture
def package(tmp_path: Path) -> Package:
    return Package(tmp_path)


def fails(package: Package, message: str, **options: Any) -> None:
    with pytest.raises(VerificationError, match=re.escape(message)):
        package.verify(**options)


def test_a_signed_package_verifies(package: Package) -> None:
    verified = package.verify()
    assert list(verified.images) == ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    models = {image.layer("model").digest for image in verified.images.values()}
    assert len(models) == 1
    assert verified.images["linux/arm/v7"].config["variant"] == "v7"


def test_the_signature_is_what_cosign_writes_and_checks(package: Package) -> None:
    """Checked the way `cosign verify --key` does, with the cryptography library alone."""
    tag = "sha256-" + package.result.digest.removeprefix("sha256:") + ".sig"
    index = json.loads((package.layout.root / "index.json").read_bytes())
    entry = next(m for m in index["manifests"] if m["annotations"][REF_NAME] == tag)
    manifest = json.loads(package.layout.get(entry["digest"]))
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = package.layout.get(layer["digest"])
    assert (
        payload
        == (
            '{"critical":{"identity":{"docker-reference":"models/diabetes"},'
            f'"image":{{"docker-manifest-digest":"{package.result.digest}"}},'
            '"type":"cosign container image signature"},"optional":null}'
        ).encode()
    )
    public = serialization.load_pem_public_key(
        (package.layout.root.parent / "keys" / "cosign.pub").read_bytes()
    )
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    public.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    config = json.loads(package.layout.get(manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"] == [layer["digest"]]


def test_a_flipped_byte_in_a_layer_is_named_by_layer_role_and_platform(package: Package) -> None:
    model = package.manifest("linux/amd64")["layers"][2]
    package.flip_byte(model["digest"])
    fails(
        package,
        f"blob {model['digest']} of layer 3 (model) of linux/amd64 does not match its descriptor: "
        "digest mismatch, its content hashes to sha256:",
    )


def test_a_flipped_byte_in_one_platforms_deps_is_caught_there_only(package: Package) -> None:
    deps = package.manifest("linux/arm64")["layers"][0]
    package.flip_byte(deps["digest"])
    fails(
        package,
        f"blob {deps['digest']} of layer 1 (deps) of linux/arm64 does not match its descriptor",
    )
    # A native-mode device checks only what it downloads: the model and serving layers.
    package.verify(roles={"model", "serving"})
    # And a device checks only its own platform.
    package.verify(platforms=["linux/amd64"])


def test_a_flipped_byte_in_a_config_is_caught(package: Package) -> None:
    config = package.manifest("linux/arm/v7")["config"]
    package.flip_byte(config["digest"], offset=10)
    fails(package, "config of linux/arm/v7 does not match its descriptor: digest mismatch")


def test_a_truncated_or_missing_blob_is_caught(package: Package) -> None:
    serving = package.manifest("linux/amd64")["layers"][3]
    path = package.layout.blob_path(serving["digest"])
    path.write_bytes(path.read_bytes()[:-1])
    fails(package, "layer 4 (serving) of linux/amd64 does not match its descriptor: size mismatch")
    path.unlink()
    fails(
        package,
        f"blob {serving['digest']} of layer 4 (serving) of linux/amd64 is missing from OCI layout",
    )


def test_a_manifest_swapped_for_another_is_caught(package: Package) -> None:
    amd64 = package.result.manifests["linux/amd64"]
    arm64 = package.result.manifests["linux/arm64"]
    shutil.copy(package.layout.blob_path(amd64.digest), package.layout.blob_path(arm64.digest))
    fails(package, "manifest for linux/arm64 does not match its descriptor: digest mismatch")


def test_an_index_listing_a_manifest_under_another_platform_is_caught(package: Package) -> None:
    """An index that points arm64 devices at the amd64 image: unsigned, and inconsistent too."""
    index = json.loads(package.layout.get(package.result.digest))
    index["manifests"][1]["digest"] = index["manifests"][0]["digest"]
    forged = package.layout.put(canonical_json(index), INDEX)
    with pytest.raises(VerificationError, match=f"package {forged.digest} is not signed"):
        verify_package(package.layout, forged, public_key=package.public)
    with pytest.raises(
        VerificationError,
        match=(
            "manifest for linux/arm64 is for a linux/amd64 image:"
            " the index lists it under the wrong platform"
        ),
    ):
        verify_contents(package.layout, forged)


def test_a_signature_by_another_key_is_refused(tmp_path: Path) -> None:
    result = build(tmp_path / "layout", model_files(tmp_path / "model"))
    layout = OCILayout(tmp_path / "layout")
    sign_package(layout, result.digest, ec.generate_private_key(ec.SECP256R1()), REPOSITORY)
    trusted = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(
        VerificationError,
        match=re.escape(
            f"signature made by another key: none of the 1 signature(s) under "
            f"{signature_tag(result.digest)} verifies with public key {key_id(trusted)}"
        ),
    ):
        verify_package(layout, result.index, public_key=trusted)


def test_a_second_signer_is_added_beside_the_first(package: Package) -> None:
    sign_package(package.layout, package.result.digest, package.other, REPOSITORY)
    package.verify()
    verify_package(package.layout, package.result.index, public_key=package.other.public_key())
    tag = signature_tag(package.result.digest)
    before = package.layout.resolve(tag)
    sign_package(package.layout, package.result.digest, package.key, REPOSITORY)
    assert package.layout.resolve(tag) == before
    assert len(json.loads(package.layout.get(before.digest))["layers"]) == 2


def test_a_signature_for_another_package_is_refused(tmp_path: Path, package: Package) -> None:
    """The signature of version 2 put under version 3's signature tag does not sign version 3."""
    other = build(tmp_path / "layout", model_files(tmp_path / "model"), version=3)
    package.layout.tag(
        signature_tag(other.digest), package.layout.resolve(signature_tag(package.result.digest))
    )
    with pytest.raises(
        VerificationError, match=f"names {package.result.digest}, not the package {other.digest}"
    ):
        verify_package(package.layout, other.index, public_key=package.public)


def test_only_a_package_that_is_there_can_be_signed(package: Package) -> None:
    absent = "sha256:" + "0" * 64
    with pytest.raises(
        PackageError, match=f"has no package {absent} to sign; build or push it first"
    ):
        sign_package(package.layout, absent, package.key, REPOSITORY)


def test_a_signature_for_another_repository_is_refused(package: Package) -> None:
    with pytest.raises(
        VerificationError, match="is for repository 'models/diabetes', not 'models/other'"
    ):
        verify_package(
            package.layout,
            package.result.index,
            public_key=package.public,
            repository="models/other",
        )


def test_an_unsigned_package_is_refused(tmp_path: Path) -> None:
    result = build(tmp_path / "layout", model_files(tmp_path / "model"))
    with pytest.raises(
        VerificationError, match=f"package {result.digest} is not signed: .* sign_package"
    ):
        verify_package(
            OCILayout(tmp_path / "layout"),
            result.index,
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
        )


def test_a_missing_platform_is_named(package: Package) -> None:
    fails(
        package,
        "has no image for linux/riscv64 (it has linux/amd64, linux/arm64, linux/arm/v7)",
        platforms=["linux/riscv64"],
    )


class DictSource:
    """Blobs held in memory, like an agent's download cache: BlobSource is all it needs."""

    def __init__(self, blobs: dict[str, bytes], tags: dict[str, Descriptor]) -> None:
        self.blobs, self.tags = blobs, tags

    def __str__(self) -> str:
        return "the download cache"

    def open(self, digest: str) -> IO[bytes]:
        if digest not in self.blobs:
            raise BlobNotFound(digest)
        return io.BytesIO(self.blobs[digest])

    def resolve(self, ref: str) -> Descriptor:
        if ref not in self.tags:
            raise RefNotFound(ref)
        return self.tags[ref]


def test_verify_works_on_any_blob_source(package: Package) -> None:
    blobs = {
        "sha256:" + p.name: p.read_bytes()
        for p in (package.layout.root / "blobs" / "sha256").iterdir()
    }
    tag = signature_tag(package.result.digest)
    source = DictSource(blobs, {tag: package.layout.resolve(tag)})
    verify_package(
        source, package.result.index, public_key=package.public, platforms=["linux/arm64"]
    )
    model = package.manifest("linux/arm64")["layers"][2]["digest"]
    del blobs[model]
    with pytest.raises(
        VerificationError,
        match="layer 3 \\(model\\) of linux/arm64 is missing from the download cache",
    ):
        verify_package(
            source, package.result.index, public_key=package.public, platforms=["linux/arm64"]
        )


@needs_skopeo
def test_skopeo_copy_all_keeps_the_index_digest_and_the_signature(
    package: Package, tmp_path: Path
) -> None:
    source, copy = package.layout.root, tmp_path / "copy"
    tag = signature_tag(package.result.digest)
    skopeo("copy", "--all", "--preserve-digests", f"oci:{source}:{TAG}", f"oci:{copy}:{TAG}")
    skopeo("copy", "--preserve-digests", f"oci:{source}:{tag}", f"oci:{copy}:{tag}")
    copied = OCILayout(copy)
    assert copied.resolve(TAG).digest == package.result.digest
    verify_package(copied, copied.resolve(TAG), public_key=package.public, repository=REPOSITORY)


@needs_skopeo
def test_a_copy_that_recompresses_the_model_layer_is_no_longer_signed(
    package: Package, tmp_path: Path
) -> None:
    """Without --preserve-digests skopeo gzips the plain-tar model layer: a different package."""
    source, copy = package.layout.root, tmp_path / "copy"
    tag = signature_tag(package.result.digest)
    skopeo("copy", "--all", f"oci:{source}:{TAG}", f"oci:{copy}:{TAG}")
    skopeo("copy", "--preserve-digests", f"oci:{source}:{tag}", f"oci:{copy}:{tag}")
    copied = OCILayout(copy)
    recompressed = copied.resolve(TAG)
    assert recompressed.digest != package.result.digest
    with pytest.raises(VerificationError, match=f"package {recompressed.digest} is not signed"):
        verify_package(copied, recompressed, public_key=package.public)


def test_generate_keypair_writes_cosign_named_files_and_keeps_old_keys(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys")
    assert (private.name, public.name) == ("cosign.key", "cosign.pub")
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PRIVATE KEY" in private.read_bytes()
    assert b"BEGIN PUBLIC KEY" in public.read_bytes()
    with pytest.raises(FileExistsError, match="cosign.key already exists"):
        generate_keypair(tmp_path / "keys")


def test_the_payload_digest_is_checked_before_the_signature(package: Package) -> None:
    sig = package.layout.resolve(signature_tag(package.result.digest))
    layer = json.loads(package.layout.get(sig.digest))["layers"][0]
    assert layer["mediaType"] == SIMPLE_SIGNING and SIGNATURE_ANNOTATION in layer["annotations"]
    package.flip_byte(layer["digest"], offset=20)
    fails(package, f"signature payload {layer['digest']} under sha256-")


def test_what_the_agent_imports_needs_only_the_stdlib_and_cryptography() -> None:
    """The agent install has no hub dependencies (onnx, flatbuffers...); verifying needs none."""
    code = (
        "import sys, contract.verify, contract.cosign, contract.serving, contract.runtimes\n"
        "print(' '.join(sorted(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    roots = {name.split(".")[0] for name in done.stdout.split()}
    allowed = set(sys.stdlib_module_names) | {"contract", "cryptography", "cffi", "_cffi_backend"}
    # Interpreter and packaging internals (site hooks, extension modules) start with "_".
    assert sorted(r for r in roots - allowed if not r.startswith("_")) == []
    assert "packager.modelfile" not in done.stdout.split()
