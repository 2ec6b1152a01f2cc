"""`model profile MODEL:VERSION --device ID`: the profile is measured on an enrolled device,
asked through its command topic (hub/commands.py, agent/commands.py), and followed here
until the device answers, the command expires or --timeout passes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import click

from contract.protocol import CommandState
from hub.cli.client import HubClient
from hub.cli.output import printable, say

POLL_SECONDS = 0.5


def _note(text: str) -> None:
    click.echo(printable(text), err=True)  # progress on stderr: stdout stays the result


def profile_on_device(hub_client: HubClient, record: dict[str, Any], device: str, *,
                      variant: str, max_batch: int, iterations: int, wait: bool,
                      timeout: int, as_json: bool,
                      emit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Ask DEVICE to profile RECORD's VARIANT; with WAIT, follow it and EMIT its rows. The
    command expires after TIMEOUT seconds, so a device that comes back later does not run
    what nobody waits for any more."""
    ref = f"{record['name']}:{record['version']}"
    sent = hub_client.post(f"/api/v1/devices/{device}/commands", json={
        "kind": "profile", "model": record["name"], "version": record["version"],
        "variant": variant, "max_batch": max_batch, "iterations": iterations,
        "expires_in": timeout})
    path = f"/api/v1/devices/{device}/commands/{sent['id']}"
    if not wait:
        if as_json:
            click.echo(json.dumps(sent, indent=2))
        else:
            say(f"Sent command {sent['id']} to device {device}: profile {ref} ({variant}); "
                f"follow it with GET {path}")
        return
    _note(f"command {sent['id']}: profile {ref} ({variant}) on device {device}, batch sizes "
          f"up to {max_batch}, {iterations} calls each; waiting up to {timeout}s")
    deadline, current = time.monotonic() + timeout, sent
    state = current["state"]
    while current["state"] in (CommandState.SENT, CommandState.RUNNING):
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_SECONDS)
        current = hub_client.get(path)
        if current["state"] != state:
            state = current["state"]
            if state == CommandState.RUNNING:
                _note(f"device {device} is profiling {ref} ({variant})")
    if current["state"] == CommandState.FAILED:
        raise click.ClickException(f"device {device} could not profile {ref}: "
                                   f"{current['error']}")
    if current["state"] != CommandState.DONE:  # still sent or running, or expired meanwhile
        raise click.ClickException(
            f"timed out after {timeout}s waiting for device {device}: it did not answer "
            f"command {sent['id']}, which now expires unrun (`edgefleet device show {device}`"
            " lists a refusal); try a longer --timeout")
    if as_json:
        click.echo(json.dumps(current["rows"], indent=2))
    else:
        emit(current["rows"])
        say(f"Stored the profile with {ref} (measured on device {device}, "
            f"{current['rows'][0]['device_class']})")
