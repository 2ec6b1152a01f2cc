"""`edgefleet package ...` and `edgefleet keys ...`: build, sign, push, verify, export.

Builds run on the machine that runs the CLI (they download wheels and
compress layers; the hub should not stall on that). The package is pushed
to the hub's registry as `models/NAME:VERSION` and the hub signs it with
its own key, the key every agent pins; `--key` adds a signature of yours.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress, TaskID

from contract import names
from contract.names import DEFAULT_VARIANT, package_tag
from contract.runtimes import RUNTIMES
from contract.settings import MAX_BATCH_SIZE
from hub.cli.models import parse_ref
from hub.cli.output import client, emit, emit_one, hub_options, json_option, say
from hub.cli.package_build import BuildEvent, BuildOptions, Stage, build_version
from hub.cli.transfer import progress_bar


class _Drawing:
    """Draws the pipeline's BuildEvents: a bar per transfer, one spinner line per other stage."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tasks: dict[tuple[Stage, str], TaskID] = {}
        self.step: TaskID | None = None

    def __call__(self, event: BuildEvent) -> None:
        if event.total is None:  # a step: replaces the one before it on the same line
            if self.step is None:
                self.step = self.bars.add_task(event.text, total=None)
            self.bars.update(self.step, description=event.text)
            return
        if self.step is not None:
            self.bars.remove_task(self.step)
            self.step = None
        key = (event.stage, event.text)
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(event.text, total=event.total)
        self.bars.advance(self.tasks[key], event.advance)

    def finish(self) -> None:
        if self.step is not None:
            self.bars.remove_task(self.step)


def _variant(text: str) -> str:
    try:
        return names.variant(text)
    except names.InvalidName as exc:
        raise click.BadParameter(str(exc), param_hint="--variant") from None


def _packager_errors() -> tuple[type[Exception], ...]:
    from contract.errors import PackageError
    from contract.signing import SignatureError

    return (PackageError, SignatureError, FileExistsError)


@click.group()
def package() -> None:
    """Build, sign, verify, list and export model packages (OCI image indexes)."""


@package.command()
@click.argument("ref")
@click.option("--platform", "platforms", default="linux/amd64,linux/arm64,linux/arm/v7",
              show_default=True, help="Comma-separated OCI platforms.")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="Name of this package among the version's packages (e.g. int8, openvino); "
              "a package never changes, so other options need another name.")
@click.option("--runtime", type=click.Choice(list(RUNTIMES)),
              help="Serving runtime [default: from the model's framework].")
@click.option("--image", is_flag=True,
              help="Make each platform's image runnable (container mode): a base with Python, the "
              "runtime's wheels and `edgefleet serve`. Without it the package is for native mode.")
@click.option("--base",
              help="Base image for --image: an OCI layout or archive, or REPOSITORY:TAG in the "
              "hub's registry [default: Debian 12 with python3, built with mmdebstrap, cached "
              "and kept in the hub's registry].")
@click.option("--base-ref", help="Tag of the base image in --base [default: its only image].")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write an OCI layout here instead of pushing to the hub.")
# Native packages have no deps layer now; scripts and tests written when it was the default
# still pass --no-deps, which asks for what is the default.
@click.option("--no-deps", "no_deps", is_flag=True, hidden=True)
@click.option("--skip-unavailable", is_flag=True,
              help="With --image: leave out platforms with no wheel or base instead of failing.")
@click.option("--optimize", type=click.Choice(["fp16", "int8"]),
              help="Shrink the model (int8: ONNX dynamic quantisation), checked for accuracy.")
@click.option("--max-abs-diff", type=float,
              help="Fail when the packaged model's outputs differ more than this from the "
              "registered one's [default: relative to the outputs' scale].")
@click.option("--prefer", help="Accelerator preferences, e.g. openvino:NPU,onnxruntime:CPU.")
@click.option("--batching", default="auto", show_default=True, metavar="auto|off|N",
              help="The package's default for adaptive batching on devices (a deployment's "
              "own setting wins): auto writes one (up to 32 rows) when a batch of 32 rows "
              "costs at most half of 32 single calls here; N: up to N rows.")
@click.option("--source-date-epoch", type=int, envvar="SOURCE_DATE_EPOCH",
              help="Timestamp for every file and date in the package "
              "[env SOURCE_DATE_EPOCH; default 0].")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also sign with this private key (e.g. from `edgefleet keys generate`).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@hub_options
@json_option
def build(
    ref: str, platforms: str, variant: str, runtime: str | None, image: bool, base: str | None,
    base_ref: str | None, out: Path | None, no_deps: bool, skip_unavailable: bool,
    optimize: str | None,
    max_abs_diff: float | None, prefer: str | None, batching: str,
    source_date_epoch: int | None, key_path: Path | None, quiet: bool, hub: str | None,
    token: str | None, as_json: bool,
) -> None:
    """Build a signed multi-platform package of MODEL:VERSION and push it to the hub.

    ONNX models packaged for OpenVINO are converted to IR; --optimize makes fp16
    or int8 variants. Either way the result is run beside the registered model
    on sample inputs and the build fails if their outputs differ too much.
    The same model version, options and SOURCE_DATE_EPOCH always give the same
    index digest, and building them again does nothing. A package never changes:
    another runtime, optimisation or platform set is another --variant of the
    version, which deploy and rollout create name with their --variant.

    \b
    Example: edgefleet package build diabetes:2 --platform linux/amd64,linux/arm64
    Example: edgefleet package build diabetes:2 --optimize int8 --variant int8
    """
    if no_deps and (image or base):
        raise click.UsageError("--no-deps and --image/--base exclude each other: an image needs "
                               "its deps")
    options = BuildOptions(
        platforms=tuple(names.comma_list(platforms)), variant=_variant(variant),
        runtime=runtime, image=image, base=base, base_ref=base_ref,
        skip_unavailable=skip_unavailable, optimize=optimize, max_abs_diff=max_abs_diff,
        prefer=tuple(names.comma_list(prefer)) if prefer else None,
        source_date_epoch=source_date_epoch, key_path=key_path,
        batching=_batching_choice(batching),
    )
    name, version = parse_ref(ref)
    hub_client = client(hub, token)
    try:
        with progress_bar(quiet=quiet or as_json) as bars:
            drawing = _Drawing(bars)
            components = click.get_current_context().find_root().obj
            built = build_version(hub_client, name, version, options, out=out, progress=drawing,
                                  run=components.accuracy_runner,
                                  timer=components.batching_timer)
            drawing.finish()
    except _packager_errors() as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_one(built.to_json(), as_json=True)
        return
    what = f"{built.model}:{built.version}" + (
        "" if built.variant == DEFAULT_VARIANT else f" variant {built.variant}")
    say(("Unchanged " if built.unchanged else "Built ", ""), (what, "bold"), f" {built.digest}")
    say(f"  runtime: {built.runtime}; platforms: {', '.join(built.platforms)}")
    for note in built.notes:
        say(f"  {note}")
    for platform, reason in built.skipped.items():
        say((f"  skipped {platform}", "yellow"), f": {reason}")
    if built.unchanged:
        say(f"  already in {hub_client.connection.hub} as {built.pushed}, signed by the hub")
    elif built.pushed is not None:
        say(f"  pushed to {hub_client.connection.hub} as {built.pushed}, signed by the hub")
    else:
        say(f"  OCI layout: {out} (tag {built.tag})"
            + ("" if key_path else "; unsigned: pass --key, or push to the hub"))


def _batching_choice(text: str) -> str | int:
    if text in ("auto", "off"):
        return text
    if text.isdigit() and 2 <= int(text) <= MAX_BATCH_SIZE:
        return int(text)
    raise click.BadParameter(f"{text!r}: give auto, off or a batch size from 2 to"
                             f" {MAX_BATCH_SIZE}", param_hint="--batching")


@contextmanager
def _open_source(
    ref: str, variant: str, hub: str | None, token: str | None
) -> Iterator[tuple[Any, str, str | None]]:
    """(image source, tag, repository) for a layout/archive path or MODEL:VERSION in the hub."""
    from contract.oci import open_image
    from packager.distribution import RemoteImage

    path_text, _, tag = ref.removeprefix("oci:").removeprefix("oci-archive:").partition(":")
    path = Path(path_text)
    if path.exists():
        with open_image(path) as source:
            if not tag:
                refs = [r for r in source.refs() if not r.endswith(".sig")]
                if len(refs) != 1:
                    raise click.BadParameter(
                        f"{path} holds {len(refs)} packages; add :TAG (one of {refs})")
                tag = refs[0]
            yield source, tag, None
        return
    name, version = parse_ref(ref)
    hub_client = client(hub, token)
    if version == "latest":
        version = str(hub_client.get(f"/api/v1/models/{name}/versions/latest")["version"])
    with hub_client.registry() as registry:
        yield (RemoteImage(registry, f"models/{name}"), package_tag(int(version), variant),
               f"models/{name}")


@package.command()
@click.argument("ref")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Public key to check the signature with [default for hub packages: the hub's].")
@click.option("--platform", "platforms", help="Only check these platforms (comma-separated).")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="Which of the version's packages.")
@hub_options
@json_option
def verify(
    ref: str, key_path: Path | None, platforms: str | None, variant: str, hub: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Check a package's signature and the digest of every blob in it.

    REF is MODEL:VERSION in the hub, an OCI layout directory or archive,
    optionally with :TAG.

    \b
    Example: edgefleet package verify ./out:2 --key cosign.pub
    """
    from contract.signing import key_id, load_public_key
    from contract.verify import verify_package

    try:
        with _open_source(ref, _variant(variant), hub, token) as (source, tag, repository):
            if key_path is not None:
                public = load_public_key(key_path.read_bytes())
            elif repository is not None:
                pem = client(hub, token).get("/api/v1/signing-key")["public_key"]
                public = load_public_key(pem)
            else:
                raise click.UsageError("give --key PUBLIC_KEY to verify a local package")
            index = source.resolve(tag)
            verified = verify_package(
                source, index, public_key=public,
                platforms=names.comma_list(platforms) or None,
            )
    except _packager_errors() as exc:
        raise click.ClickException(f"verification failed: {exc}") from None
    blobs = sum(len(image.layers) + 2 for image in verified.images.values())
    result = {"ok": True, "digest": index.digest, "key": key_id(public),
              "platforms": sorted(verified.images), "blobs_checked": blobs}
    if as_json:
        emit_one(result, as_json=True)
    else:
        say(("Verified", "green"), f" {tag} {index.digest}: signed by {key_id(public)}, "
            f"{blobs} blobs checked across {', '.join(result['platforms'])}")


@package.command()
@click.argument("ref")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The OCI archive to write (e.g. pkg.tar).")
@click.option("--platform", "platforms", help="Only these platforms (comma-separated).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="Which of the version's packages.")
@hub_options
def export(
    ref: str, out: Path, platforms: str | None, quiet: bool, variant: str, hub: str | None,
    token: str | None,
) -> None:
    """Write a package from the hub, with its signatures, as an OCI archive.

    For air-gapped devices and for inspection with skopeo or umoci.

    \b
    Example: edgefleet package export diabetes:2 --out diabetes-2.tar
    """
    from contract.oci import OCILayout
    from packager.archive import write_archive
    from packager.distribution import pull_signature, pull_to_layout

    name, version = parse_ref(ref)
    hub_client = client(hub, token)
    if version == "latest":
        version = str(hub_client.get(f"/api/v1/models/{name}/versions/latest")["version"])
    tag = package_tag(int(version), _variant(variant))
    try:
        with hub_client.registry() as registry, \
                tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp, \
                progress_bar(quiet=quiet) as bars:
            layout = OCILayout.create(Path(tmp) / "layout")
            task = bars.add_task(f"pull models/{name}:{tag}", total=None)
            index = pull_to_layout(
                registry, f"models/{name}", tag, layout,
                platforms=names.comma_list(platforms) or None,
                progress=lambda n: bars.advance(task, n),
            )
            pull_signature(registry, f"models/{name}", index.digest, layout)
            write_archive(layout, out)
    except _packager_errors() as exc:
        raise click.ClickException(str(exc)) from None
    say(f"Wrote {out} ({index.digest}, tag {tag})")


@package.command("list")
@click.argument("model", required=False)
@hub_options
@json_option
def list_(model: str | None, hub: str | None, token: str | None, as_json: bool) -> None:
    """List packages in the hub, or those of MODEL.

    \b
    Example: edgefleet package list diabetes
    """
    rows = client(hub, token).get("/api/v1/packages", params={"model": model})
    emit(rows, ["model", "version", "variant", "digest", "platforms", "signed", "updated_at"],
         as_json=as_json)


@package.command()
@click.argument("ref")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="Which of the version's packages.")
@hub_options
@json_option
def show(ref: str, variant: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Show a package: platforms, and each image's layers with their roles and sizes.

    \b
    Example: edgefleet package show diabetes:2
    """
    name, version = parse_ref(ref)
    hub_client = client(hub, token)
    if version == "latest":
        version = str(hub_client.get(f"/api/v1/models/{name}/versions/latest")["version"])
    record = hub_client.get(f"/api/v1/packages/{name}/{version}",
                            params={"variant": _variant(variant)})
    if as_json:
        emit_one(record, as_json=True)
        return
    images = record.pop("images")
    emit_one(record, as_json=False)
    for image in images:
        say((image["platform"], "bold"), f" {image['digest']}")
        emit(image["layers"], ["role", "size", "media_type", "digest"], as_json=False)
