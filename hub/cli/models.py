"""`edgefleet model ...`: register, list, show, download and delete model versions."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

import click

from contract import names
from hub.cli import drift
from hub.cli.client import HubClient
from hub.cli.output import client, emit, emit_one, hub_options, json_option, parse_pairs, say
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
    """Register, list, show, download and delete model versions."""


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
    """Show one version: files, signature, tags, metrics, lineage.

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
    emit_one(record, as_json=False)
    for kind in ("inputs", "outputs"):
        for t in signature[kind]:
            say((kind[:-1], "bold"), f": {t['name']} {t['datatype']} {t['shape']}")
    emit(files, ["path", "size", "digest"], as_json=False)
    if deployments:
        say(("deployed on", "bold"), ": ", [d["device_id"] for d in deployments])


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
