"""`edgefleet model ...`: register, list, show, download and delete model versions."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import click

from contract import names
from contract.errors import FormatError
from contract.names import DEFAULT_VARIANT
from contract.profiles import MAX_ITERATIONS, batch_sizes
from contract.protocol import MAX_COMMAND_VALIDITY, MAX_PROFILE_ITERATIONS
from contract.runtimes import RUNTIMES
from hub.cli.client import HubClient
from hub.cli.device_profile import profile_on_device
from hub.cli.output import (
    client,
    emit,
    emit_one,
    hub_options,
    json_option,
    parse_pairs,
    printable,
    say,
)
from hub.cli.transfer import download_file, progress_bar, upload_file


def parse_ref(ref: str) -> tuple[str, str]:
    """NAME:VERSION, NAME:latest or NAME (meaning latest)."""
    try:
        name, version = names.model_ref(ref)
    except names.InvalidName as exc:
        raise click.BadParameter(str(exc)) from None
    return name, "latest" if version is None else str(version)


def collect_files(path: Path) -> dict[str, Path]:
    """Map relative POSIX names to files: one file, or everything under a directory."""
    if path.is_file():
        return {path.name: path}
    if not path.is_dir():
        raise click.BadParameter(f"{path} is neither a file nor a directory", param_hint="PATH")
    files = {
        p.relative_to(path).as_posix(): p
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(path).parts
    }
    if not files:
        raise click.BadParameter(f"{path} holds no files", param_hint="PATH")
    return files


def git_lineage(path: Path) -> dict[str, Any]:
    """The commit and dirty flag of the git work tree PATH sits in, if any."""
    where = path if path.is_dir() else path.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "--", "."))}


def download_version(
    hub_client: HubClient, record: dict[str, Any], out: Path,
    progress: Callable[[str, int], None],
) -> dict[str, Path]:
    """Fetch every file of the version RECORD into OUT, digests checked; name -> path.

    PROGRESS is told (file name, bytes) as each chunk arrives.
    """
    files: dict[str, Path] = {}
    for f in record["files"]:
        name: str = f["path"]
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise click.ClickException(f"refusing unsafe file name from the hub: {name!r}")
        download_file(
            hub_client,
            f"/api/v1/models/{record['name']}/versions/{record['version']}/files/{name}",
            out / rel, f["digest"], partial(progress, name),
        )
        files[name] = out / rel
    return files


@click.group()
def model() -> None:
    """Register, list, show, profile, download and delete model versions."""


@model.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", required=True, help="Model name (lower case, e.g. diabetes).")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE, repeatable.")
@click.option("--metric", "metrics", multiple=True, help="KEY=NUMBER, repeatable.")
@click.option("--description", default="", help="Free text.")
@click.option("--dataset-digest", help="Digest of the training data, for lineage.")
@click.option("--run-id", help="Training run id (e.g. from MLflow), for lineage.")
@click.option("--allow-non-model", is_flag=True,
              help="Register the files even if none is a model the packager reads.")
@click.option("--baseline", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A sample of the training inputs (.npy, .npz, .csv) to watch drift "
              "against; see `edgefleet model baseline`.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@hub_options
@json_option
def register(
    path: Path, name: str, tags: tuple[str, ...], metrics: tuple[str, ...], description: str,
    dataset_digest: str | None, run_id: str | None, allow_non_model: bool,
    baseline: Path | None, quiet: bool, hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Register a file or a directory of files as the next version of NAME.

    The framework (ONNX, OpenVINO IR, TFLite) and the input/output signature
    are read from the files; files among which there is no such model (a .pkl,
    say) are refused unless --allow-non-model. Inside a git work tree the commit
    and dirty flag are recorded too.

    \b
    Example: edgefleet model register model.onnx --name diabetes --tag team=health --metric rmse=53
    """
    metric_values: dict[str, float] = {}
    for key, value in parse_pairs(metrics, "--metric").items():
        try:
            metric_values[key] = float(value)
        except ValueError:
            raise click.BadParameter(
                f"{key}={value}: not a number", param_hint="--metric") from None
    lineage = git_lineage(path)
    if dataset_digest:
        lineage["dataset_digest"] = dataset_digest
    if run_id:
        lineage["run_id"] = run_id
    files = collect_files(path)
    hub_client = client(hub, token)
    refs = []
    with progress_bar(quiet=quiet or as_json) as progress:
        for rel, file in files.items():
            task = progress.add_task(f"upload {rel}", total=file.stat().st_size)
            refs.append({"path": rel, "digest": upload_file(hub_client, file, progress, task)})
    record = hub_client.post(
        f"/api/v1/models/{name}/versions",
        json={
            "files": refs, "description": description, "tags": parse_pairs(tags, "--tag"),
            "metrics": metric_values, "lineage": lineage, "require_model": not allow_non_model,
        },
    )
    if as_json:
        emit_one(record, as_json=True)
    else:
        say("Registered ", (f"{record['name']}:{record['version']}", "bold"),
            f" ({record['framework'] or 'unknown framework'}, {len(record['files'])} file(s))")
    if baseline is not None:
        # A refused baseline leaves the version registered: `model baseline` can add one.
        from hub.cli import drift  # numpy and the hub's drift code: only for drift commands

        summary = drift.send_baseline(hub_client, name, str(record["version"]), baseline)
        if not as_json:
            say(f"Baseline of {len(summary['features'])} feature(s) from {baseline.name}")


@model.command()
@click.argument("ref")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@hub_options
@json_option
def baseline(ref: str, file: Path, hub: str | None, token: str | None, as_json: bool) -> None:
    """Give a version its drift baseline from FILE, a sample of its training inputs.

    FILE is .npy or .csv (rows of the model's only input; a CSV may start with a
    header) or .npz (one array per input name; arrays named as outputs are a
    baseline of predictions). Only per-feature statistics, bin edges (the
    sample's deciles) and counts leave this machine. A sample that does not
    match the version's signature is refused; a version has one baseline, set
    before it is deployed.

    \b
    Example: edgefleet model baseline diabetes:3 train_inputs.npy
    """
    from hub.cli import drift

    name, version = parse_ref(ref)
    summary = drift.send_baseline(client(hub, token), name, version, file)
    if as_json:
        emit_one(summary, as_json=True)
        return
    emit(summary["features"], ["side", "tensor", "column", "count", "mean", "std", "min", "max"],
         as_json=False)


@model.command("drift")
@click.argument("ref")
@click.option("--target", "targets", multiple=True,
              help="KEY=VALUE device tag, repeatable (all must match); default: every device.")
@click.option("--window", default="24h", show_default=True,
              help="How far back the devices' sketches count: 30m, 6h, 7d.")
@hub_options
@json_option
def drift_(ref: str, targets: tuple[str, ...], window: str, hub: str | None,
           token: str | None, as_json: bool) -> None:
    """Drift of a version's inputs and predictions from its baseline, per feature.

    Computed now from the sketches its devices sent: PSI and Jensen-Shannon
    distance between the baseline's bin shares and the devices'. A feature
    drifts at PSI >= 0.2 on at least 100 values; the hub also computes this
    on a schedule and raises a drift.detected event when a feature starts drifting.

    \b
    Example: edgefleet model drift diabetes:3 --target stage=prod
    """
    name, version = parse_ref(ref)
    report = client(hub, token).get(f"/api/v1/models/{name}/versions/{version}/drift",
                                    params={"target": list(targets), "window": window})
    from hub.cli import drift

    drift.show_drift(report, as_json=as_json)


@model.command("list")
@click.argument("name", required=False)
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE filter, repeatable (all must match).")
@click.option("--limit", default=100, show_default=True, help="At most this many versions.")
@hub_options
@json_option
def list_(
    name: str | None, tags: tuple[str, ...], limit: int, hub: str | None, token: str | None,
    as_json: bool,
) -> None:
    """List models, or the versions of NAME.

    \b
    Example: edgefleet model list diabetes --tag stage=prod
    """
    params = {"tag": list(tags)}
    if name is None:
        rows = client(hub, token).get("/api/v1/models", params=params)
        emit(rows, ["name", "versions", "latest_version", "updated_at"], as_json=as_json)
        return
    rows = client(hub, token).get(
        f"/api/v1/models/{name}/versions", params={**params, "limit": limit}
    )
    emit(
        rows,
        ["name", "version", "framework", "size", "tags", "metrics", "created_at"],
        as_json=as_json,
    )


@model.command()
@click.argument("ref")
@hub_options
@json_option
def show(ref: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Show one version: files, signature, tags, metrics, lineage, profile.

    \b
    Example: edgefleet model show diabetes:2
    """
    name, version = parse_ref(ref)
    record = client(hub, token).get(f"/api/v1/models/{name}/versions/{version}")
    if as_json:
        emit_one(record, as_json=True)
        return
    signature = record.pop("signature") or {"inputs": [], "outputs": []}
    files = record.pop("files")
    deployments = record.pop("deployments")
    profile_rows = record.pop("profiles")
    emit_one(record, as_json=False)
    for kind in ("inputs", "outputs"):
        for t in signature[kind]:
            say((kind[:-1], "bold"), f": {t['name']} {t['datatype']} {t['shape']}")
    emit(files, ["path", "size", "digest"], as_json=False)
    if deployments:
        say(("deployed on", "bold"), ": ", [d["device_id"] for d in deployments])
    if profile_rows:
        say(("profile", "bold"), ":")
        _emit_profile(profile_rows)


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _emit_profile(rows: list[dict[str, Any]]) -> None:
    """Profile rows as a table for people: throughput in rows/s, peak memory in MiB."""
    emit([{**r, "throughput": f"{r['throughput']:.0f}/s", "peak_rss": _mib(r["peak_rss_bytes"])}
          for r in rows], ["device_class", "variant", "runtime", "device", "batch", "p50_ms",
                           "p99_ms", "throughput", "peak_rss"], as_json=False)


def _note(*parts: object) -> None:
    """A progress line: on stderr, so stdout stays the result (and --json stays JSON)."""
    click.echo(printable("".join(str(p) for p in parts)), err=True)


@dataclass(frozen=True)
class _Source:
    variant: str
    model_dir: Path
    entrypoint: str
    framework: str


def _variants(hub_client: HubClient, record: dict[str, Any], asked: tuple[str, ...]
              ) -> tuple[list[str], bool]:
    """The variants to profile and whether they come from packages: ASKED, else every
    variant the version has a package of, else the registered files as the default."""
    ref = f"{record['name']}:{record['version']}"
    for variant in asked:
        try:
            names.variant(variant)
        except names.InvalidName as exc:
            raise click.BadParameter(str(exc), param_hint="--variant") from None
    packaged = sorted({p["variant"] for p in hub_client.get(
        "/api/v1/packages", params={"model": record["name"]}) if p["version"] == record[
            "version"]})
    if not packaged and set(asked) <= {DEFAULT_VARIANT}:
        return [DEFAULT_VARIANT], False
    lacking = sorted(set(asked) - set(packaged))
    if lacking:
        raise click.ClickException(
            f"{ref} has no package of variant {lacking[0]} (it has "
            f"{', '.join(packaged) or 'none'}); build one with `edgefleet package build {ref} "
            f"--variant {lacking[0]}`")
    return list(asked) or packaged, True


def _sources(hub_client: HubClient, profiler: Any, record: dict[str, Any], variants: list[str],
             packaged: bool, work: Path, failed: list[str]) -> Iterator[_Source]:
    """Each variant's model, unpacked under WORK: from its package (fetched and verified as a
    device does), or the registered files; a variant that cannot be had goes to FAILED."""
    if not packaged:
        if record["framework"] is None:
            raise click.ClickException(
                f"{record['name']}:{record['version']} holds no model file a runtime reads "
                "(.onnx, .tflite, OpenVINO .xml); nothing to profile")
        download_version(hub_client, record, work / "registered", lambda path, n: None)
        yield _Source(DEFAULT_VARIANT, work / "registered", record["entrypoint"],
                      record["framework"])
        return
    from contract.signing import load_public_key

    key = load_public_key(hub_client.get("/api/v1/signing-key")["public_key"])
    with hub_client.registry() as registry:
        for variant in variants:
            _note(f"fetch the {variant} package of {record['name']}:{record['version']}")
            try:
                staged = profiler.stage_package(
                    registry, f"models/{record['name']}",
                    names.package_tag(record["version"], variant), key, work / variant)
            except Exception as exc:  # the agent's; its message says what and why
                failed.append(f"variant {variant}: {exc}")
                _note(f"  variant {variant} failed: {exc}")
                continue
            yield _Source(variant, staged.model_dir, staged.entrypoint, staged.framework)


def _on_device(hub_client: HubClient, name: str, version: str, device: str, *,
               runtimes: tuple[str, ...], variants: tuple[str, ...], no_store: bool,
               max_batch: int, iterations: int, wait: bool, timeout: int,
               as_json: bool) -> None:
    if runtimes or no_store:
        raise click.UsageError("--runtime and --no-store are for profiles on this machine: "
                               "a device profiles every runtime it has and always stores")
    if len(variants) > 1 or iterations > MAX_PROFILE_ITERATIONS:
        raise click.UsageError(f"with --device: one --variant, at most "
                               f"{MAX_PROFILE_ITERATIONS} --iterations")
    variant = variants[0] if variants else DEFAULT_VARIANT
    try:
        names.variant(variant)
    except names.InvalidName as exc:
        raise click.BadParameter(str(exc), param_hint="--variant") from None
    record = hub_client.get(f"/api/v1/models/{name}/versions/{version}")
    profile_on_device(hub_client, record, device, variant=variant, max_batch=max_batch,
                      iterations=iterations, wait=wait, timeout=timeout, as_json=as_json,
                      emit=_emit_profile)


@model.command()
@click.argument("ref")
@click.option("--max-batch", default=8, show_default=True,
              help="Largest batch size: the powers of two below it are measured, then it "
              "(8: 1, 2, 4, 8).")
@click.option("--iterations", type=click.IntRange(1, MAX_ITERATIONS), default=50,
              show_default=True, help="Timed calls per batch size (after one warm-up call).")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(list(RUNTIMES)),
              help="Only this runtime (repeatable) [default: every one here that reads the "
              "model's format].")
@click.option("--variant", "variants", multiple=True,
              help="Only this package variant (repeatable) [default: every variant the "
              "version has a package of; without packages, its registered files as "
              "variant default].")
@click.option("--no-store", is_flag=True, help="Only print the profile; do not store it.")
@click.option("--device", metavar="DEVICE_ID",
              help="Measure on this enrolled, online device instead (where its accelerators "
              "are): one --variant [default: default], every runtime it has.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="With --device: wait for the device's answer (progress on stderr).")
@click.option("--timeout", type=click.IntRange(1, int(MAX_COMMAND_VALIDITY.total_seconds())),
              default=600, show_default=True,
              help="With --device: seconds to wait; the device's command expires then too.")
@hub_options
@json_option
@click.pass_obj
def profile(
    components: Any, ref: str, max_batch: int, iterations: int, runtimes: tuple[str, ...],
    variants: tuple[str, ...], no_store: bool, device: str | None, wait: bool, timeout: int,
    hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Measure a version on this machine, or on an enrolled device (--device), and store
    the profile with it on the hub.

    Each variant's model (fp32, fp16, int8...: from its package, fetched and
    verified as a device does) runs through the agent's own runtimes, on each
    runtime that reads it and each device that runtime lists (no GPU or NPU
    here: CPU only), in a process of its own: latency p50/p99 at each batch
    size, throughput (rows/s) and the process's peak resident memory. OpenVINO
    runs at f32. Rows are stored under this machine's platform as the device
    class; a rollout's --max-latency-ms compares with them.

    \b
    With --device the device does the same with the variant's package
    (fetched and verified as for a deployment) on every runtime and device
    it has, and its rows are stored under its platform with its id as host.
    One profile at a time per device; it must be online.

    \b
    Example: edgefleet model profile diabetes:2 --max-batch 32 --iterations 100
    Example: edgefleet model profile diabetes:2 --device dev-7f3a --timeout 300
    """
    name, version = parse_ref(ref)
    try:
        batches = batch_sizes(max_batch)
    except FormatError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-batch") from None
    if device is not None:
        _on_device(client(hub, token), name, version, device, runtimes=runtimes,
                   variants=variants, no_store=no_store, max_batch=max_batch,
                   iterations=iterations, wait=wait, timeout=timeout, as_json=as_json)
        return
    profiler = components.model_profiler()
    hub_client = client(hub, token)
    record = hub_client.get(f"/api/v1/models/{name}/versions/{version}")
    ref = f"{record['name']}:{record['version']}"
    chosen, packaged = _variants(hub_client, record, variants)
    device_class = profiler.device_class()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-profile-") as tmp:
        for source in _sources(hub_client, profiler, record, chosen, packaged, Path(tmp),
                               failed):
            targets, skipped = profiler.targets(source.framework, list(runtimes) or None)
            if not targets:
                why = "; ".join(skipped) or f"none of {', '.join(runtimes)} reads it"
                failed.append(f"variant {source.variant}: no runtime here can load it: {why}")
                _note(f"no runtime here can load {ref} ({source.variant}, {source.framework}):"
                      f" {why}")
            for target in targets:
                where = f"{target.runtime}:{target.device}"
                _note(f"profile {ref} ({source.variant}) on {where} ({device_class}): batch "
                      f"sizes {', '.join(map(str, batches))}; {iterations} calls each")
                try:
                    for row in profiler.profile(source.model_dir, source.entrypoint, target,
                                                batches, iterations,
                                                partial(_note, f"  {where}: ")):
                        rows.append({"device_class": device_class, "variant": source.variant,
                                     **row})
                        _note(f"  {target.runtime}:{row['device']} batch {row['batch']}: "
                              f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
                              f"{row['throughput']:.0f} rows/s, "
                              f"peak RSS {_mib(row['peak_rss_bytes'])}")
                except Exception as exc:  # the agent's; its message is what helps
                    failed.append(f"{source.variant} on {where}: {exc}")
                    _note(f"  {where} failed: {exc}")
    if not rows:
        raise click.ClickException(f"nothing could be profiled of {ref}: {'; '.join(failed)}")
    if not no_store:
        hub_client.post(f"/api/v1/models/{name}/versions/{record['version']}/profiles",
                        json={"host": socket.gethostname(), "rows": rows})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _emit_profile(rows)
    if not no_store and not as_json:
        say(f"Stored the profile with {ref} ({device_class})")
    if failed:
        sys.exit(1)


@model.command()
@click.argument("ref")
@click.option(
    "--out", type=click.Path(path_type=Path),
    help="Directory to write into [default: NAME-VERSION].",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@hub_options
def download(ref: str, out: Path | None, quiet: bool, hub: str | None, token: str | None) -> None:
    """Download a version's files; each is checked against its digest.

    \b
    Example: edgefleet model download diabetes:2 --out ./diabetes
    """
    name, version = parse_ref(ref)
    hub_client = client(hub, token)
    record = hub_client.get(f"/api/v1/models/{name}/versions/{version}")
    out = out or Path(f"{name}-{record['version']}")
    with progress_bar(quiet=quiet) as bars:
        tasks = {f["path"]: bars.add_task(f"download {f['path']}", total=f["size"])
                 for f in record["files"]}
        download_version(hub_client, record, out, lambda path, n: bars.advance(tasks[path], n))
    say(f"Downloaded {name}:{record['version']} into {out}/")


@model.command()
@click.argument("ref")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@hub_options
def delete(ref: str, yes: bool, hub: str | None, token: str | None) -> None:
    """Delete one version (refused while a device runs it).

    \b
    Example: edgefleet model delete diabetes:1 --yes
    """
    name, version = parse_ref(ref)
    if version == "latest":
        raise click.BadParameter("name the version to delete, e.g. diabetes:1", param_hint="REF")
    if not yes:
        click.confirm(f"Delete {name}:{version}?", abort=True)
    client(hub, token).delete(f"/api/v1/models/{name}/versions/{version}")
    say(f"Deleted {name}:{version}")
