"""Build a package: an OCI image index with one image per platform, written to an OCI layout.

A native package's image is the model layer and the serving layer (see
`packager.layers`); a runnable image (container mode, asked for with DEPS)
adds below them the base image's layers, the runtime's and the serving
process's Python packages for its platform, and edgefleet's own serving code
(`packager.image`). Its config runs
`edgefleet serve --host 0.0.0.0 --control-socket /run/edgefleet/control.sock`
on port 8500: the agent mounts /run/edgefleet, passes the API key in
EDGEFLEET_SERVE_API_KEY, and loads the model through the control socket
from the serving.json that EDGEFLEET_SERVING points at, as in native mode.
The base image must bring Python 3.11 (`packager.base` makes one from Debian).

Every timestamp is SOURCE_DATE_EPOCH: the `source_date_epoch` argument, else
the environment variable, else 0 (1970-01-01, as most reproducible-build
tools do). The hub passes the model version's registration time. Same inputs
and epoch, same index digest, byte for byte.

The layout's index.json tags the package index (by default with the
version), and `contract.cosign.sign_package` adds its signature beside it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contract import names
from contract.canonical import canonical_json
from contract.errors import FormatError, PackageError
from contract.layers import PYTHON_DIR, ROLE, SERVING_FILE
from contract.oci import (
    CONFIG,
    CREATED,
    INDEX,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST,
    TITLE,
    VERSION,
    Descriptor,
    OCIArchive,
    OCILayout,
    Platform,
    open_image,
    parse_index,
    parse_json,
    parse_manifest,
    read_blob,
)
from contract.runtimes import choose_runtime
from contract.serving import sample_request as make_sample_request
from contract.serving import serving_document
from packager.base import DebianBase
from packager.deps import DepsProvider, PlatformUnavailable
from packager.image import (
    SERVE_REQUIREMENTS,
    app_layer,
    cached_deps_layer,
    default_layer_cache,
)
from packager.layers import Layer, model_layer, serving_layer
from packager.modelfile import ModelInfo
from packager.tarball import check_relative_path

DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64", "linux/arm/v7")
ENTRYPOINT = ["edgefleet", "serve"]
COMMAND = ["--host", "0.0.0.0", "--control-socket", "/run/edgefleet/control.sock"]
SERVING_ENV = "EDGEFLEET_SERVING"
SCORING_PORT = "8500/tcp"
BASE = "base"


@dataclass(frozen=True)
class BuildProgress:
    """Where a build is: STEP is running, COMPLETED of TOTAL steps are done."""

    step: str
    completed: int
    total: int


@dataclass(frozen=True)
class BuildResult:
    layout: Path
    tag: str
    index: Descriptor
    manifests: Mapping[str, Descriptor]
    # Platform -> why it was left out (only with skip_unavailable).
    skipped: Mapping[str, str]

    @property
    def digest(self) -> str:
        return self.index.digest


def build_package(
    layout: Path,
    *,
    name: str,
    version: int | str,
    files: Mapping[str, Path],
    info: ModelInfo,
    runtime: str | None = None,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    base_image: Path | None = None,
    base_ref: str | None = None,
    deps: DepsProvider | None = None,
    debian: DebianBase | None = None,
    layer_cache: Path | None = None,
    skip_unavailable: bool = False,
    source_date_epoch: int | None = None,
    prefer: Sequence[str] | None = None,
    sample_request: Mapping[str, Any] | None = None,
    tag: str | None = None,
    index_annotations: Mapping[str, str] | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    batching: Mapping[str, int] | None = None,
) -> BuildResult:
    """Build model NAME VERSION from FILES (relative name -> file) into the OCI layout LAYOUT.

    INFO is what `packager.modelfile.inspect_model` says about FILES. DEPS
    provides each platform's Python packages and makes the images runnable
    (None: native mode only, no deps or edgefleet layer). BASE_IMAGE is an
    OCI layout or archive (BASE_REF picks its tag when it has several);
    DEBIAN instead builds one from Debian packages (`packager.base`);
    LAYER_CACHE keeps built deps layers (default ~/.cache/edgefleet/layers). With
    SKIP_UNAVAILABLE, a platform that has no wheel or no base image is left
    out instead of failing the build. PREFER overrides the
    runtime's accelerator preference; SAMPLE_REQUEST the self-test request
    generated from the signature. BATCHING is serving.json's batching default (see
    packager/batching.py; None: none). INDEX_ANNOTATIONS go on the index only (the hub's build
    pipeline records the variant and build inputs there). PROGRESS is called as each step
    starts.
    """
    chosen = choose_runtime(info.framework, runtime)
    targets = _platforms(platforms)
    model_files = _model_files(files, info.entrypoint)
    preferences = _preferences(prefer if prefer is not None else chosen.prefer)
    tag = _tag(str(version) if tag is None else tag)
    epoch = _source_date_epoch(source_date_epoch)
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    serving = _serving_json(name, version, info, chosen.name, preferences, sample_request,
                            batching)
    annotations = {TITLE: name, VERSION: str(version), CREATED: created}

    requirements = (*chosen.requirements, *SERVE_REQUIREMENTS)
    if debian is not None and base_image is not None:
        raise PackageError("give a base image or a Debian base spec, not both")
    uses_base = base_image is not None or debian is not None
    total = 3 + len(targets) * (1 + bool(deps) + uses_base) + (debian is not None)
    done = 0
    report = progress or (lambda _: None)

    def step(name: str) -> None:
        nonlocal done
        report(BuildProgress(name, done, total))
        done += 1

    skipped: dict[str, str] = {}

    def unavailable(platform: Platform, exc: PlatformUnavailable) -> None:
        if not skip_unavailable:
            raise exc
        skipped[str(platform)] = str(exc)

    # Wheels and base images are what a platform can lack. Both are found before any layer is
    # built, wheels first (pip answers in seconds, a Debian base takes minutes), so a missing
    # platform fails (or is skipped) at once, not after the others' work.
    trees: dict[Platform, Path | None] = {}
    for platform in targets:
        if deps is None:
            trees[platform] = None
            continue
        step(f"wheels for {platform}")
        try:
            trees[platform] = deps(requirements, platform)
        except PlatformUnavailable as exc:
            unavailable(platform, exc)
    if debian is not None:
        for platform in list(trees):
            try:
                debian.check(platform)
            except PlatformUnavailable as exc:
                unavailable(platform, exc)
                del trees[platform]
        if trees:
            step("Debian base image")
            base_image, base_ref = debian([str(p) for p in trees])

    store = OCILayout.create(layout)
    sources: dict[Platform, tuple[list[Layer], dict[str, Any], Path | None]] = {}
    with open_image(base_image) if base_image else contextlib.nullcontext() as base:
        for platform, tree in trees.items():
            base_layers: list[Layer] = []
            base_config: dict[str, Any] = {}
            if base is not None:
                step(f"base image for {platform}")
                try:
                    base_layers, base_config = base_image_layers(store, base, base_ref, platform)
                except PlatformUnavailable as exc:
                    unavailable(platform, exc)
                    continue
            sources[platform] = (base_layers, base_config, tree)
    if not sources:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped.items())
        raise PackageError(f"no platform could be built: {reasons}")

    step("model layer")
    model = model_layer(store, model_files, mtime=epoch)
    step("serving layer")
    shared = [model, serving_layer(store, serving, mtime=epoch)]
    app = app_layer(store) if deps else None

    manifests: dict[str, Descriptor] = {}
    for platform, (base_layers, base_config, tree) in sources.items():
        step(f"image for {platform}")
        own = [cached_deps_layer(store, tree, layer_cache or default_layer_cache())] if tree else []
        layers = [*base_layers, *own, *([app] if app else []), *shared]
        config = _image_config(
            base_config, platform, layers, created=created, labels=annotations, deps=bool(own)
        )
        manifests[str(platform)] = _put_manifest(store, config, layers, annotations, platform)

    report(BuildProgress("index", total - 1, total))
    index = store.put(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": INDEX,
                "manifests": [d.to_dict() for d in manifests.values()],
                "annotations": {**annotations, **(index_annotations or {})},
            }
        ),
        INDEX,
    )
    store.tag(tag, index)
    report(BuildProgress("done", total, total))
    return BuildResult(Path(layout), tag, index, manifests, skipped)


def _serving_json(
    name: str,
    version: int | str,
    info: ModelInfo,
    runtime: str,
    prefer: Sequence[str],
    sample_request: Mapping[str, Any] | None,
    batching: Mapping[str, int] | None,
) -> bytes:
    assert info.framework is not None and info.entrypoint is not None  # checked before
    signature = None if info.signature is None else info.signature.to_dict()
    if sample_request is None and signature is not None:
        sample_request = make_sample_request(signature)
    return canonical_json(
        serving_document(
            model=name,
            version=version,
            runtime=runtime,
            framework=info.framework,
            entrypoint=info.entrypoint,
            signature=signature,
            prefer=prefer,
            sample_request=sample_request,
            batching=batching,
        )
    )


def _platforms(platforms: Sequence[str]) -> list[Platform]:
    parsed = [Platform.parse(p) for p in platforms]
    if not parsed:
        raise PackageError("no platforms given; name at least one, e.g. linux/arm64")
    if len(set(parsed)) != len(parsed):
        raise PackageError(f"a platform is named twice in {', '.join(platforms)}")
    return parsed


def _model_files(files: Mapping[str, Path], entrypoint: str | None) -> dict[str, Path]:
    if not files:
        raise PackageError("a package needs at least one model file")
    for name, path in files.items():
        check_relative_path(name)
        if not Path(path).is_file():
            raise PackageError(f"model file {name} is not a file at {path}")
    if entrypoint not in files:
        raise PackageError(
            f"the model's entrypoint {entrypoint!r} is not among its files"
            f" ({', '.join(sorted(files))})"
        )
    return dict(files)


def _preferences(prefer: Sequence[str]) -> list[str]:
    for item in prefer:
        runtime, _, device = item.partition(":")
        if not runtime or not device:
            raise PackageError(
                f"accelerator preference {item!r} is not runtime:DEVICE, e.g. openvino:NPU"
            )
    return list(prefer)


def _tag(tag: str) -> str:
    if not names.OCI_TAG.matches(tag):
        raise PackageError(
            f"{tag!r} cannot be a tag: use letters, digits, '_', '.' and '-' (at most 128, "
            "not starting with '.' or '-')"
        )
    return tag


def _source_date_epoch(explicit: int | None) -> int:
    if explicit is not None:
        value: int | str = explicit
    else:
        value = os.environ.get("SOURCE_DATE_EPOCH", "0")
    try:
        epoch = int(value)
    except ValueError:
        raise PackageError(
            f"SOURCE_DATE_EPOCH={value!r} is not a whole number of seconds"
        ) from None
    if epoch < 0:
        raise PackageError(f"SOURCE_DATE_EPOCH={epoch} is before 1970")
    return epoch


def base_image_layers(
    store: OCILayout, base: OCILayout | OCIArchive, ref: str | None, platform: Platform
) -> tuple[list[Layer], dict[str, Any]]:
    """The base's layers for PLATFORM, copied into STORE, and its config."""
    if ref is None:
        refs = sorted(base.refs())
        if len(refs) != 1:
            raise PackageError(
                f"base image {base} has {len(refs)} tags ({', '.join(refs) or 'none'});"
                " name one with base_ref"
            )
        ref = refs[0]
    what = f"base image {base}:{ref}"
    descriptor = base.resolve(ref)
    if descriptor.media_type in INDEX_TYPES:
        entries = parse_index(read_blob(base, descriptor, what=what), what=what)
        matching = [d for d in entries if d.platform and d.platform.matches(platform)]
        if not matching:
            have = ", ".join(str(d.platform) for d in entries if d.platform)
            raise PlatformUnavailable(f"{what} has no {platform} image (it has {have or 'none'})")
        descriptor = matching[0]
    manifest = parse_manifest(read_blob(base, descriptor, what=what), what=f"manifest of {what}")
    config = parse_json(
        read_blob(base, manifest.config, what=f"config of {what}"), what=f"config of {what}"
    )
    found = Platform.from_dict(config, what=f"config of {what}")
    if not found.matches(platform):
        raise PlatformUnavailable(f"{what} is a {found} image, not {platform}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
        raise FormatError(f"config of {what} does not list one diff_id per layer")
    layers = []
    for number, (layer, diff_id) in enumerate(zip(manifest.layers, diff_ids, strict=True), start=1):
        if layer.media_type not in LAYER_TYPES:
            raise FormatError(
                f"layer {number} of {what} has unsupported media type {layer.media_type}"
            )
        store.copy_from(base, layer, what=f"layer {number} of {what}")
        oci_layer = replace(
            layer,
            media_type=LAYER_TYPES[layer.media_type],
            annotations={**layer.annotations, ROLE: BASE},
        )
        layers.append(Layer(oci_layer, diff_id))
    return layers, config


def _image_config(
    base: Mapping[str, Any],
    platform: Platform,
    layers: Sequence[Layer],
    *,
    created: str,
    labels: Mapping[str, str],
    deps: bool,
) -> dict[str, Any]:
    run = dict(base.get("config") or {})
    env = [e for e in run.get("Env") or [] if not e.startswith(f"{SERVING_ENV}=")]
    env.append(f"{SERVING_ENV}=/{SERVING_FILE}")
    if deps:
        # Ahead of the base image's own PYTHONPATH, so the platform's runtime wins.
        base_path = next((e.partition("=")[2] for e in env if e.startswith("PYTHONPATH=")), "")
        env = [e for e in env if not e.startswith("PYTHONPATH=")]
        env.append("PYTHONPATH=" + ":".join(filter(None, [f"/{PYTHON_DIR}", base_path])))
    run.update(
        Env=env,
        Entrypoint=ENTRYPOINT,
        Cmd=COMMAND,
        ExposedPorts={**(run.get("ExposedPorts") or {}), SCORING_PORT: {}},
        Labels={**(run.get("Labels") or {}), **labels},
    )
    config = {key: value for key, value in base.items() if key != "variant"}
    config.update(platform.to_dict())
    config.update(
        created=created,
        config=run,
        rootfs={"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        history=[
            *(base.get("history") or []),
            *(
                {"created": created, "created_by": f"edgefleet package: {layer.role} layer"}
                for layer in layers
                if layer.role != BASE
            ),
        ],
    )
    return config


def _put_manifest(
    store: OCILayout,
    config: Mapping[str, Any],
    layers: Sequence[Layer],
    annotations: Mapping[str, str],
    platform: Platform,
) -> Descriptor:
    config_descriptor = store.put(canonical_json(config), CONFIG)
    manifest = store.put(
        canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": config_descriptor.to_dict(),
                "layers": [layer.descriptor.to_dict() for layer in layers],
                "annotations": dict(annotations),
            }
        ),
        MANIFEST,
    )
    return replace(manifest, platform=platform)
