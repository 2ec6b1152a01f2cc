"""`edgefleet firmware`: device images with the agent preinstalled."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO

import click

from contract.errors import PackageError


@click.group()
def firmware() -> None:
    """Build device images that enroll themselves on first boot."""


@firmware.command()
@click.argument("device_class", metavar="CLASS")
@click.option("--out", "out_dir", default="firmware-out", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Where the image goes.")
@click.option("--mirror", help="Debian mirror, e.g. a snapshot.debian.org URL to pin the "
                               "package versions [default: deb.debian.org].")
@click.option("--no-security-mirror", is_flag=True,
              help="Leave out bookworm-security (with a pinned --mirror, say).")
@click.option("--epoch", type=int, help="SOURCE_DATE_EPOCH for every time stamp "
                                        "[default: $SOURCE_DATE_EPOCH, else the last commit's].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Cache of wheels, .debs and built images "
                   "[default: ~/.cache/edgefleet/firmware].")
@click.option("--rebuild", is_flag=True,
              help="Build even if the cache holds an image built from the same inputs.")
def build(device_class: str, out_dir: Path, mirror: str | None, no_security_mirror: bool,
          epoch: int | None, cache_dir: Path | None, rebuild: bool) -> None:
    """Build CLASS's image: a class name from firmware-images/classes/ or a .toml file.

    \b
    Classes with disk_image (amd64, arm64) give OUT/CLASS.img, a raw GPT disk (UEFI,
    systemd-boot) to write to a disk or boot in a VM; others OUT/CLASS-rootfs.tar. Beside it:
    CLASS.packages.txt (every package and version) and CLASS.json. An image built
    before from the same inputs (class, source, package selection, epoch) is copied
    from the cache instead. Needs root
    (mmdebstrap), and qemu-user-static for a foreign architecture.

    Example: sudo edgefleet firmware build generic-amd64 --out images/
    """
    from packager.firmware import build as builder
    from packager.firmware import classes

    try:
        cls = classes.find(device_class)
    except classes.ClassError as exc:
        raise click.ClickException(str(exc)) from None
    settings = builder.BuildSettings(
        device_class=cls, out_dir=out_dir,
        epoch=builder.default_epoch() if epoch is None else epoch,
        cache_dir=cache_dir or builder.default_cache_dir(),
        mirror=mirror or builder.MIRROR,
        security_mirror=None if no_security_mirror else builder.SECURITY_MIRROR,
        rebuild=rebuild,
    )
    started = time.monotonic()
    try:
        result = builder.build(settings, log=lambda line: click.echo(f"==> {line}", err=True))
    except PackageError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result.image} ({result.image.stat().st_size / 2**20:.0f} MiB) in "
               f"{time.monotonic() - started:.0f} s; contents in {result.packages}")


@firmware.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("enrollment_file", type=click.File("r"))
def enroll(image: Path, enrollment_file: TextIO) -> None:
    """Put ENROLLMENT_FILE ('-': stdin) on IMAGE's boot partition, before flashing it.

    The file is `edgefleet agent install`'s format: hub=URL and token=efe_... lines,
    optionally name=, serving_api_key=. For an https:// hub the token is the whole one
    the hub printed, which pins its CA (efe_....<64 hex digits>); `edgefleet device
    token create --image-config FILE --device-hub URL` writes such a file. Every device
    flashed from IMAGE enrolls with it (a token with enough uses) and gets its own
    identity.

    Example: edgefleet firmware enroll images/generic-amd64.img enrollment.conf
    """
    from contract import enrollment
    from packager.firmware import disk

    text = enrollment_file.read()
    try:
        config = enrollment.parse(text)
    except enrollment.EnrollmentFileError as exc:
        raise click.ClickException(f"enrollment file: {exc}") from None
    if config.token is None:
        raise click.ClickException("enrollment file: token: missing")
    try:
        disk.write_enrollment(image, enrollment.render(config))
    except disk.DiskError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{image}: enrolls with {config.hub} at first boot", file=sys.stdout)


@firmware.command("agent-image")
@click.option("--platform", "platforms", multiple=True, default=["linux/amd64", "linux/arm64"],
              show_default=True, help="OCI platform; repeat for several.")
@click.option("--runtime", "runtimes", multiple=True, default=["onnxruntime"],
              show_default=True, help="Runtime installed in the image; repeat for several.")
@click.option("--out", "layout", default="agent-image", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="OCI layout to write.")
@click.option("--tag", default="latest", show_default=True, help="Tag in the layout.")
@click.option("--epoch", type=int, help="SOURCE_DATE_EPOCH [default: the last commit's].")
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PEM private key (the hub's keys/hub-signing.key) to sign the image with.")
def agent_image(platforms: tuple[str, ...], runtimes: tuple[str, ...], layout: Path, tag: str,
                epoch: int | None, sign_key: Path | None) -> None:
    """Build the agent as a multi-platform OCI image (container hosts, Kubernetes).

    The image runs `edgefleet agent run` with its state in the volume
    /var/lib/edgefleet and the enrollment file mounted at
    /run/secrets/edgefleet-enrollment. Copy it with `skopeo copy --all
    --preserve-digests oci:LAYOUT:TAG ...` to keep the signature valid.

    Example: edgefleet firmware agent-image --out agent-image --sign-key hub/keys/hub-signing.key
    """
    from contract import signing
    from packager.agent_image import build_agent_image
    from packager.firmware.build import default_epoch

    key = signing.load_private_key(sign_key) if sign_key else None
    try:
        image = build_agent_image(
            layout, platforms, runtimes=runtimes, tag=tag, key=key,
            epoch=default_epoch() if epoch is None else epoch,
            log=lambda line: click.echo(f"==> {line}", err=True))
    except PackageError as exc:
        raise click.ClickException(str(exc)) from None
    signed = " (signed)" if key else ""
    click.echo(f"{layout}:{tag} {image.index.digest}{signed}: {', '.join(image.manifests)}")
