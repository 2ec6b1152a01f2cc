"""The package build pipeline as one plain function: `build_version`.

It asks the hub first whether the package variant exists: built from the same
inputs, there is nothing to do (the build would give the same digest); from
other inputs, the hub refuses (409, naming what uses it) before any work,
since a package never changes. Otherwise it downloads a model version's
files from the hub, prepares the model for its runtime, builds the package,
then pushes it to the hub's registry and has the hub sign it (or writes an
OCI layout). It reports progress through a callback
and prints nothing, so `edgefleet package build` only parses options, draws
the progress and prints the result, and tests call it in-process.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.names import DEFAULT_VARIANT
from hub.cli.client import HubClient
from hub.cli.models import download_version

if TYPE_CHECKING:
    from packager.batching import ModelTimer
    from packager.prepare import ModelRunner, PreparedModel


class Stage(enum.Enum):
    DOWNLOAD = "download"
    PREPARE = "prepare"
    BUILD = "build"
    PUSH = "push"
    SIGN = "sign"


@dataclass(frozen=True)
class BuildEvent:
    """One step of the pipeline: TEXT is what runs now.

    Transfers (download, push) also carry ADVANCE, the bytes moved since the
    last event with the same TEXT, and TOTAL, the bytes that transfer moves.
    """

    stage: Stage
    text: str
    advance: int = 0
    total: int | None = None


def _ignore(event: BuildEvent) -> None:
    del event


@dataclass(frozen=True)
class BuildOptions:
    """What `package build` takes besides MODEL:VERSION; see its --help for each."""

    platforms: tuple[str, ...]
    variant: str = DEFAULT_VARIANT  # the package's name among the version's packages
    runtime: str | None = None
    image: bool = False  # runnable images (container mode): base, deps and edgefleet layers
    base: str | None = None  # an OCI layout or archive, or REPOSITORY:TAG in the hub's registry
    base_ref: str | None = None
    skip_unavailable: bool = False
    optimize: str | None = None
    max_abs_diff: float | None = None
    prefer: tuple[str, ...] | None = None
    source_date_epoch: int | None = None
    key_path: Path | None = None  # also sign with this private key
    # serving.json's batching default: "auto" (measured, packager/batching.py), "off", or
    # the max batch size to write
    batching: str | int = "auto"

    def inputs(self, runtime: str, files: Mapping[str, str]) -> dict[str, Any]:
        """What makes the package (FILES: the version's path -> digest): recorded on it,
        so a later build of its variant is known to be the same package (nothing to do) or
        another one (refused)."""
        epoch = self.source_date_epoch
        listed = json.dumps(sorted(files.items())).encode()
        return {
            "files": "sha256:" + hashlib.sha256(listed).hexdigest(), "runtime": runtime,
            "platforms": sorted(self.platforms), "skip_unavailable": self.skip_unavailable,
            "image": self.image or self.base is not None, "base": self.base,
            "base_ref": self.base_ref, "optimize": self.optimize,
            "max_abs_diff": self.max_abs_diff,
            "prefer": list(self.prefer) if self.prefer is not None else None,
            "source_date_epoch": str(epoch) if epoch is not None
            else os.environ.get("SOURCE_DATE_EPOCH", "0"),
            # Only when not the default: inputs recorded before the option keep matching.
            **({} if self.batching == "auto" else {"batching": self.batching}),
        }


@dataclass(frozen=True)
class BuiltPackage:
    model: str
    version: int
    variant: str
    digest: str
    tag: str
    runtime: str
    platforms: tuple[str, ...]
    skipped: Mapping[str, str]  # platform -> why it was left out
    notes: tuple[str, ...]  # conversion steps and their accuracy check
    accuracy: str | None  # how far the packaged model's outputs are from the registered one's
    pushed: str | None = None  # REPOSITORY:TAG in the hub, when pushed
    signature: str | None = None  # digest of the hub's signature, when pushed
    layout: Path | None = None  # the OCI layout written, when not pushed
    unchanged: bool = False  # the hub had this very package already: nothing was built

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "model": self.model, "version": self.version, "variant": self.variant,
            "digest": self.digest, "unchanged": self.unchanged,
            "platforms": list(self.platforms), "skipped": dict(self.skipped),
            "runtime": self.runtime, "notes": list(self.notes),
            "accuracy": self.accuracy,
        }
        if self.pushed is not None:
            record |= {"pushed": self.pushed, "signature": self.signature}
        if self.layout is not None:
            record["layout"] = str(self.layout)
        return record


def build_version(
    hub: HubClient, name: str, version: str, options: BuildOptions, *, run: ModelRunner,
    timer: ModelTimer | None = None,
    out: Path | None = None, progress: Callable[[BuildEvent], None] = _ignore,
) -> BuiltPackage:
    """Build model NAME's VERSION ("latest" too) and push it, signed by the hub, or write it
    to the OCI layout OUT (signed only with OPTIONS.key_path). RUN runs a model for the
    accuracy check of a converted or optimised one (the composition root passes the agent's
    runtimes: the check runs the model as a device will); TIMER times it for the batching
    default when OPTIONS.batching is "auto" (without one, no default is written).

    Raises the hub client's one-line errors and the packager's own (PackageError,
    SignatureError, FileExistsError) for the caller to report.
    """
    from contract.canonical import canonical_json
    from contract.cosign import sign_package
    from contract.layers import BUILD, VARIANT
    from contract.names import package_tag
    from contract.oci import OCILayout
    from contract.runtimes import check_platforms, choose_runtime
    from contract.signing import load_private_key

    record = hub.get(f"/api/v1/models/{name}/versions/{version}")
    name, number = record["name"], record["version"]
    tag = package_tag(number, options.variant)
    # Loaded before any work, so a bad key file fails at once.
    key = load_private_key(options.key_path) if options.key_path is not None else None
    runtime = choose_runtime(record["framework"], options.runtime).name
    check_platforms(options.platforms)
    inputs = options.inputs(runtime, {f["path"]: f["digest"] for f in record["files"]})
    if out is None:
        variant = {"variant": options.variant}
        found = hub.get(f"/api/v1/packages/{name}/{number}/check",  # 409 if the name is taken
                        params={**variant, "build": json.dumps(inputs)})
        if found["exists"]:
            if not found["signed"]:
                progress(BuildEvent(Stage.SIGN, "sign with the hub's key"))
                hub.post(f"/api/v1/packages/{name}/{number}/sign", params=variant)
            shown = hub.get(f"/api/v1/packages/{name}/{number}", params=variant)
            return BuiltPackage(
                model=name, version=number, variant=options.variant, digest=found["digest"],
                tag=tag, runtime=runtime, platforms=tuple(sorted(shown["platforms"])),
                skipped={}, notes=("already built from the same inputs: nothing to do",),
                accuracy=None, pushed=f"models/{name}:{tag}",
                unchanged=True)
    # The build side is loaded only now: a build with nothing to do is answered without it.
    from packager.base import DebianBase, pull_base
    from packager.build import BuildProgress, build_package
    from packager.deps import PipDeps
    from packager.distribution import push_layout
    from packager.modelfile import ModelInfo
    from packager.prepare import prepare_model

    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmp:
        sizes = {f["path"]: f["size"] for f in record["files"]}
        files = download_version(
            hub, record, Path(tmp) / "model",
            progress=lambda path, n: progress(
                BuildEvent(Stage.DOWNLOAD, f"download {path}", n, sizes[path])),
        )
        info = ModelInfo.from_dict({k: record[k] for k in ("framework", "entrypoint", "signature")})
        progress(BuildEvent(Stage.PREPARE, f"prepare the model for {runtime}"))
        prepared = prepare_model(
            files, info, runtime=runtime, optimize=options.optimize,
            work_dir=Path(tmp) / "prepared", run=run, max_abs_diff=options.max_abs_diff,
            progress=lambda text: progress(BuildEvent(Stage.PREPARE, text)),
        )

        batching, notes = _batching(options.batching, prepared, runtime, timer, progress)

        def built(event: BuildProgress) -> None:
            progress(BuildEvent(Stage.BUILD, f"[{event.completed + 1}/{event.total}] {event.step}"))

        layout_dir = out or Path(tmp) / "layout"
        runnable = options.image or options.base is not None
        with hub.registry() as registry:
            base_image = Path(options.base) if options.base else None
            base_ref = options.base_ref
            if options.base and base_image is not None and not base_image.exists():
                # Not a file here: a base in the hub's registry, e.g. one an earlier build pushed.
                progress(BuildEvent(Stage.BUILD, f"pull the base image {options.base}"))
                base_image = Path(tmp) / "base"
                base_ref = pull_base(registry, options.base, OCILayout.create(base_image))
            result = build_package(
                layout_dir, name=name, version=number, files=prepared.files,
                info=prepared.info, runtime=runtime, platforms=options.platforms,
                base_image=base_image, base_ref=base_ref,
                deps=PipDeps() if runnable else None,
                # The Debian base is shared through the hub's registry: pulled if another
                # build pushed it, else built here (and pushed with the package).
                debian=DebianBase(registry=registry, push=out is None)
                if options.image and options.base is None else None,
                skip_unavailable=options.skip_unavailable,
                source_date_epoch=options.source_date_epoch, prefer=options.prefer, tag=tag,
                batching=batching,
                index_annotations={VARIANT: options.variant,
                                   BUILD: canonical_json(inputs).decode()},
                progress=built,
            )
        layout = OCILayout(layout_dir)
        repository = f"models/{name}"
        if key is not None:
            progress(BuildEvent(Stage.SIGN, "sign with your key"))
            sign_package(layout, result.digest, key, repository)
        package = BuiltPackage(
            model=name, version=number, variant=options.variant, digest=result.digest,
            tag=result.tag, runtime=runtime,
            platforms=tuple(sorted(result.manifests)), skipped=dict(result.skipped),
            notes=(*prepared.notes, *notes),
            accuracy=prepared.accuracy.describe() if prepared.accuracy else None,
        )
        if out is not None:
            return replace(package, layout=out)
        total = sum(p.stat().st_size for p in (layout_dir / "blobs").rglob("*") if p.is_file())
        text = f"push {repository}:{result.tag}"
        sent = 0

        def pushed(n: int) -> None:
            nonlocal sent
            sent += n
            progress(BuildEvent(Stage.PUSH, text, n, total))

        pushed(0)
        with hub.registry() as registry:
            refs = [r for r in layout.refs() if r == result.tag or r.endswith(".sig")]
            push_layout(layout, registry, repository, refs, progress=pushed)
        pushed(max(0, total - sent))  # the manifests, which go up whole without reports
        progress(BuildEvent(Stage.SIGN, "sign with the hub's key"))
        signed = hub.post(f"/api/v1/packages/{name}/{number}/sign",
                          params={"variant": options.variant})
        return replace(package, pushed=f"{repository}:{result.tag}", signature=signed["signature"])


def _batching(
    choice: str | int, prepared: PreparedModel, runtime: str, timer: ModelTimer | None,
    progress: Callable[[BuildEvent], None],
) -> tuple[dict[str, int] | None, list[str]]:
    """serving.json's batching default for CHOICE ("auto", "off" or a max batch size) and
    the notes that say why."""
    from contract.errors import PackageError
    from contract.settings import unbatchable
    from packager.batching import measure_batching

    signature = None if prepared.info.signature is None else prepared.info.signature.to_dict()
    if choice == "off" or (choice == "auto" and timer is None):
        return None, []
    if isinstance(choice, int):
        why = ("it has no signature" if prepared.info.signature is None
               else unbatchable(prepared.info.signature))
        if why is not None:
            raise PackageError(f"--batching needs a model that can batch ({why}); use"
                               " --batching off")
        return {"max_batch_size": choice, "max_delay_ms": 0}, [f"batching: on, {choice} rows"]
    assert timer is not None and prepared.info.entrypoint is not None
    progress(BuildEvent(Stage.PREPARE, f"time the model on {runtime} for batching"))
    profile = measure_batching(timer, runtime, prepared.files, prepared.info.entrypoint,
                               signature)
    return profile.setting, [profile.note]
