"""`edgefleet deploy` and `edgefleet undeploy`: what one device should run."""

from __future__ import annotations

from typing import Any

import click

from contract import names
from contract.names import DEFAULT_VARIANT
from hub.cli.models import parse_ref
from hub.cli.output import client, emit_one, hub_options, json_option, say
from hub.cli.settings import settings_body, settings_options, settings_text
from hub.validation import is_number


def _version(text: str) -> int | str:
    return int(text) if is_number(text) else text


@click.command()
@click.argument("ref", metavar="MODEL:VERSION")
@click.option("--device", "device_id", required=True,
              help="The device's id (see `edgefleet device list`).")
@click.option("--deployment", "name",
              help="Deployment name on the device [default: the model's name].")
@click.option("--prefer",
              help="Runtimes and accelerators, best first: openvino:GPU,onnxruntime:CPU.")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="The version's package variant, as named by `package build --variant`.")
@click.option("--candidate",
              help="A second version beside MODEL:VERSION, for an A/B split or shadow.")
@click.option("--traffic", type=click.IntRange(1, 100),
              help="Percent of requests the candidate answers (split, 1-99) or gets a copy "
              "of (shadow).")
@click.option("--shadow", is_flag=True,
              help="The candidate only gets copies; MODEL:VERSION answers all.")
@click.option("--candidate-variant", default=DEFAULT_VARIANT, show_default=True,
              help="The candidate's package variant.")
@settings_options
@hub_options
@json_option
def deploy(
    ref: str, device_id: str, name: str | None, prefer: str | None, variant: str,
    candidate: str | None, traffic: int | None, shadow: bool, candidate_variant: str,
    cpus: str | None, memory: str | None, gpus: int | None, accelerators: tuple[str, ...],
    batch_size: int | None, batch_delay_ms: int | None,
    hub: str | None, token: str | None, as_json: bool,
) -> None:
    """Make a device run MODEL:VERSION; replaces that deployment's version if it has one.

    The hub signs the device's new desired state and the device applies it
    when it is online. The version needs a signed package (`edgefleet package build`).
    Resources and batching are the deployment's: a deploy without them leaves them to
    the agent's defaults and the package's, and a change of them alone is applied as an
    update (the version loaded again, or its container or pods replaced).

    \b
    Example: edgefleet deploy diabetes:2 --device dev-0a1b2c3d4e5f --candidate 3 --traffic 10
    Example: edgefleet deploy diabetes:2 --device dev-0a1b2c3d4e5f --cpus 0.5 --memory 512Mi
             --gpus 1 --batch-size 32 --batch-delay-ms 2
    """
    model, version = parse_ref(ref)
    if (traffic is not None or shadow) and candidate is None:
        raise click.UsageError("--traffic and --shadow are about a --candidate version; add one")
    if candidate is not None and traffic is None and not shadow:
        raise click.UsageError("a split candidate needs --traffic N (its percent of requests), "
                               "or add --shadow")
    if candidate is not None and not (is_number(candidate) or candidate == "latest"):
        raise click.BadParameter(f"{candidate!r} should be a version number of {model}",
                                 param_hint="--candidate")
    body: dict[str, Any] = {"model": model, "version": _version(version), "variant": variant,
                            "name": name or model, "prefer": names.comma_list(prefer),
                            **settings_body(cpus=cpus, memory=memory, gpus=gpus,
                                            accelerators=accelerators, batch_size=batch_size,
                                            batch_delay_ms=batch_delay_ms)}
    if candidate is not None:
        body["candidate"] = {"version": _version(candidate), "traffic": traffic or 100,
                             "shadow": shadow, "variant": candidate_variant}
    answer = client(hub, token).post(f"/api/v1/devices/{device_id}/deployments", json=body)
    if as_json:
        emit_one(answer, as_json=True)
        return
    d = answer["deployment"]
    extra = ""
    if (c := d["candidate"]) is not None:
        extra = (f" with {d['model']}:{c['version']} in shadow on {c['traffic']}% of requests"
                 if c["shadow"] else f" with {d['model']}:{c['version']} on {c['traffic']}%")
    runs = f"{d['model']}:{d['version']}" + (
        "" if d["variant"] == DEFAULT_VARIANT else f" (variant {d['variant']})")
    settings = settings_text(d)
    say(f"{device_id}: {d['name']} runs {runs}{extra}" + (f" with {settings}" if settings else "")
        + f" (desired generation {answer['generation']})")
    say((f"Follow it with: edgefleet device show {device_id}", "dim"))


@click.command()
@click.argument("name")
@click.option("--device", "device_id", required=True, help="The device's id.")
@hub_options
@json_option
def undeploy(name: str, device_id: str, hub: str | None, token: str | None, as_json: bool) -> None:
    """Remove deployment NAME from a device; it stops serving it.

    \b
    Example: edgefleet undeploy diabetes --device dev-0a1b2c3d4e5f
    """
    answer = client(hub, token).delete(f"/api/v1/devices/{device_id}/deployments/{name}").json()
    if as_json:
        emit_one(answer, as_json=True)
        return
    say(f"{device_id}: removed {name} (desired generation {answer['generation']})")
